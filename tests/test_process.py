"""ManagedProcess, the run registry and the reaper, with real subprocesses; wait strategies."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.stacks import process as process_module
from harness.stacks.base import StackError
from harness.stacks.process import RUN_ID_ENV, ManagedProcess, free_port, reap_leftovers
from harness.stacks.waiting import (AllOf, ChatSucceeds, GrpcHealthy, HttpOk, LogMatches, PortOpen,
                                    ProcessExited, WaitTimeout)

# A child that ignores SIGTERM, prints 'ready' and sleeps.
IGNORES_SIGTERM = (
    "import signal, time, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)"
)
# A parent that starts a grandchild in the same group, prints the grandchild's pid, and sleeps.
FORKS_GRANDCHILD = (
    "import subprocess, sys, time; "
    "child = subprocess.Popen([sys.executable, '-c', " + repr(IGNORES_SIGTERM) + "]); "
    "print('grandchild', child.pid, flush=True); time.sleep(60)"
)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Give each test its own cache folder and run id, so runs of other tests stay untouched."""
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(process_module, "_run_id", None)


def pid_alive(pid: int) -> bool:
    """Return True when ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for_line(path: Path, prefix: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                if line.startswith(prefix):
                    return line
        time.sleep(0.05)
    raise AssertionError(f"no line starting with {prefix!r} in {path}")


def test_output_goes_to_log(tmp_path):
    log_path = tmp_path / "echo.log"
    with ManagedProcess("echo", [sys.executable, "-c", "print('hello'); import sys; print('oops', file=sys.stderr)"],
                        env=None, log_path=log_path) as child:
        assert child.wait(10) == 0

    text = log_path.read_text()
    assert "hello" in text
    assert "oops" in text
    assert child.returncode == 0
    assert child.alive() is False


def test_env_and_run_id_reach_child(tmp_path):
    log_path = tmp_path / "env.log"
    script = f"import os; print(os.environ['GREETING'], os.environ['{RUN_ID_ENV}'], os.environ.get('HOME_GONE'))"
    with ManagedProcess("env", [sys.executable, "-c", script], env={"GREETING": "hi", "HOME_GONE": None},
                        log_path=log_path) as child:
        child.wait(10)

    greeting, run_id, removed = log_path.read_text().splitlines()[-1].split()
    assert greeting == "hi"
    assert run_id == process_module.current_run_id()
    assert removed == "None"


def test_stop_terminates_sleep(tmp_path):
    child = ManagedProcess("sleep", ["sleep", "60"], env=None, log_path=tmp_path / "sleep.log")
    child.start()
    assert child.alive()

    started = time.monotonic()
    code = child.stop(timeout=5)

    assert code == -signal.SIGTERM
    assert time.monotonic() - started < 3
    assert not pid_alive(child.pid)


def test_sigterm_ignored_gets_sigkill(tmp_path):
    log_path = tmp_path / "stubborn.log"
    child = ManagedProcess("stubborn", [sys.executable, "-c", IGNORES_SIGTERM], env=None, log_path=log_path)
    child.start()
    wait_for_line(log_path, "ready")

    started = time.monotonic()
    code = child.stop(timeout=0.5)
    elapsed = time.monotonic() - started

    assert code == -signal.SIGKILL
    assert 0.5 <= elapsed < 5
    assert not pid_alive(child.pid)


def test_grandchild_in_group_stopped(tmp_path):
    log_path = tmp_path / "parent.log"
    child = ManagedProcess("parent", [sys.executable, "-c", FORKS_GRANDCHILD], env=None, log_path=log_path)
    child.start()
    grandchild_pid = int(wait_for_line(log_path, "grandchild").split()[1])
    assert pid_alive(grandchild_pid)
    assert os.getpgid(grandchild_pid) == child.pid

    child.stop(timeout=0.5)

    assert not pid_alive(child.pid)
    assert not pid_alive(grandchild_pid)
    assert not child.group_alive()


def test_stop_is_idempotent(tmp_path):
    never_started = ManagedProcess("idle", ["sleep", "1"], env=None, log_path=tmp_path / "idle.log")
    assert never_started.stop() is None

    child = ManagedProcess("short", ["true"], env=None, log_path=tmp_path / "short.log")
    child.start()
    child.wait(10)
    assert child.stop() == 0
    assert child.stop() == 0


def test_failed_start_raises_and_cleans(tmp_path):
    child = ManagedProcess("missing", [str(tmp_path / "no-such-binary")], env=None, log_path=tmp_path / "m.log")
    with pytest.raises(OSError, match="cannot start missing"):
        with child:
            pass
    assert child.popen is None


def test_context_exit_on_error_stops_child(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ManagedProcess("sleep", ["sleep", "60"], env=None, log_path=tmp_path / "s.log") as child:
            pid = child.pid
            raise RuntimeError("boom")
    assert not pid_alive(pid)


def test_log_tail_last_lines(tmp_path):
    log_path = tmp_path / "count.log"
    with ManagedProcess("count", [sys.executable, "-c", "for i in range(100): print(i)"], env=None,
                        log_path=log_path) as child:
        child.wait(10)

    assert child.log_tail(3).splitlines() == ["97", "98", "99"]
    assert ManagedProcess("none", ["true"], env=None, log_path=tmp_path / "absent.log").log_tail() == ""


def test_pid_record_removed_on_stop(tmp_path):
    child = ManagedProcess("sleep", ["sleep", "60"], env=None, log_path=tmp_path / "s.log")
    child.start()
    record = process_module.current_run_dir() / "pids" / str(child.pid)
    name, start_time = record.read_text().split()
    assert name == "sleep"
    assert start_time == process_module._process_start_time(child.pid)

    child.stop(timeout=5)

    assert not record.exists()


def test_reaper_kills_dead_runs_groups(tmp_path):
    """A harness process that is SIGKILLed leaves its child group; the next run reaps it."""
    cache = os.environ["HARNESS_CACHE_DIR"]
    script = (
        "import sys, time\n"
        "from harness.stacks.process import ManagedProcess\n"
        f"child = ManagedProcess('orphan', [sys.executable, '-c', {FORKS_GRANDCHILD!r}], env=None, "
        f"log_path={str(tmp_path / 'orphan.log')!r})\n"
        "child.start()\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "HARNESS_CACHE_DIR": cache})
    try:
        orphan_pgid = int(owner.stdout.readline())
        grandchild_pid = int(wait_for_line(tmp_path / "orphan.log", "grandchild").split()[1])

        assert reap_leftovers() == [], "the owner is alive, so nothing may be reaped"
        assert pid_alive(orphan_pgid)

        owner.kill()
        owner.wait()
        reaped = reap_leftovers()
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        try:
            os.killpg(orphan_pgid, signal.SIGKILL)
        except (ProcessLookupError, NameError, UnboundLocalError):
            pass

    assert reaped == [orphan_pgid]
    deadline = time.monotonic() + 5
    while (pid_alive(orphan_pgid) or pid_alive(grandchild_pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(orphan_pgid)
    assert not pid_alive(grandchild_pid)
    assert list((Path(cache) / "runs").iterdir()) == []


def test_reaper_kills_group_without_run_id_in_environ(tmp_path):
    """sglang-router overwrites its environment with its process title; the start time still matches."""
    run_dir = Path(os.environ["HARNESS_CACHE_DIR"]) / "runs" / "dead-run-cleared-environ"
    (run_dir / "pids").mkdir(parents=True)
    (run_dir / "owner").write_text("999999999 0\n")
    # env -i execs sleep in place with an empty environment, so no HARNESS_RUN_ID is left.
    orphan = subprocess.Popen(["env", "-i", "sleep", "60"], start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while b"HARNESS_RUN_ID" in Path(f"/proc/{orphan.pid}/environ").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.02)
        start_time = process_module._process_start_time(orphan.pid)
        (run_dir / "pids" / str(orphan.pid)).write_text(f"router\n{start_time}\n")

        assert reap_leftovers() == [orphan.pid]
        assert orphan.wait(5) == -signal.SIGKILL
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def test_reaper_spares_pgid_with_other_start_time(tmp_path):
    unrelated = subprocess.Popen(["env", "-i", "sleep", "60"], start_new_session=True)
    try:
        run_dir = Path(os.environ["HARNESS_CACHE_DIR"]) / "runs" / "dead-run-reused"
        (run_dir / "pids").mkdir(parents=True)
        (run_dir / "owner").write_text("999999999 0\n")
        (run_dir / "pids" / str(unrelated.pid)).write_text("router\n1\n")

        assert reap_leftovers() == []
        assert unrelated.poll() is None
    finally:
        unrelated.kill()
        unrelated.wait()


def test_reaper_spares_reused_pgid(tmp_path):
    """A dead run's record whose pgid now belongs to an unrelated group is removed, not killed."""
    unrelated = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        run_dir = Path(os.environ["HARNESS_CACHE_DIR"]) / "runs" / "dead-run"
        (run_dir / "pids").mkdir(parents=True)
        (run_dir / "owner").write_text("999999999 0\n")
        (run_dir / "pids" / str(unrelated.pid)).write_text("sleep\n")

        assert reap_leftovers() == []
        assert unrelated.poll() is None
        assert not run_dir.exists()
    finally:
        unrelated.kill()
        unrelated.wait()


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    assert 0 < port < 65536


# -- wait strategies ---------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    # Per path: the (status, body) responses in order, the last one repeated.
    script: dict[str, list[tuple[int, str]]] = {}
    calls: dict[str, int] = {}

    def _answer(self) -> None:
        responses = self.script.get(self.path, [(404, "{}")])
        count = self.calls.get(self.path, 0)
        self.calls[self.path] = count + 1
        status, body = responses[min(count, len(responses) - 1)]
        if self.command == "POST":
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = _answer
    do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def http_server():
    _Handler.script, _Handler.calls = {}, {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Handler
    server.shutdown()
    server.server_close()


def test_port_open_waits_for_listener():
    port = free_port()
    listener = socket.socket()

    def listen_later() -> None:
        time.sleep(0.5)
        listener.bind(("127.0.0.1", port))
        listener.listen()

    threading.Thread(target=listen_later).start()
    try:
        PortOpen("127.0.0.1", port).wait(None, timeout=10)
    finally:
        time.sleep(0.6)
        listener.close()


def test_timeout_message_names_target(tmp_path):
    port = free_port()
    with ManagedProcess("server", [sys.executable, "-c", "print('booting'); import time; time.sleep(60)"],
                        env=None, log_path=tmp_path / "server.log") as child:
        wait_for_line(child.log_path, "booting")
        started = time.monotonic()
        with pytest.raises(WaitTimeout) as raised:
            HttpOk(f"http://127.0.0.1:{port}/health", component="fake server").wait(child, timeout=1.0)
        elapsed = time.monotonic() - started

    first_line = str(raised.value).splitlines()[0]
    assert first_line.startswith(f"fake server not ready at http://127.0.0.1:{port}/health after 1.")
    assert "booting" in str(raised.value)
    assert isinstance(raised.value, StackError)
    assert elapsed < 3


def test_exited_process_fails_at_once(tmp_path):
    with ManagedProcess("crasher", [sys.executable, "-c", "print('dying'); raise SystemExit(3)"],
                        env=None, log_path=tmp_path / "crash.log") as child:
        started = time.monotonic()
        with pytest.raises(ProcessExited) as raised:
            PortOpen("127.0.0.1", free_port()).wait(child, timeout=30)
        elapsed = time.monotonic() - started

    assert raised.value.returncode == 3
    assert "crasher exited with code 3" in str(raised.value)
    assert "dying" in str(raised.value)
    assert elapsed < 5


def test_http_ok_after_503(http_server):
    base, handler = http_server
    handler.script["/health"] = [(503, "{}"), (503, "{}"), (200, "{}")]

    HttpOk(base + "/health").wait(None, timeout=10)

    assert handler.calls["/health"] == 3


def test_chat_retries_tokenizer_not_ready(http_server):
    base, handler = http_server
    handler.script["/v1/chat/completions"] = [
        (503, '{"error": {"code": "tokenizer_not_ready"}}'),
        (400, '{"error": {"code": "tokenizer_not_found", "message": "no tokenizer"}}'),
        (200, '{"choices": []}'),
    ]

    ChatSucceeds(base, model="m").wait(None, timeout=20)

    assert handler.calls["/v1/chat/completions"] == 3


def test_chat_other_400_fails_fast(http_server):
    base, handler = http_server
    handler.script["/v1/chat/completions"] = [(400, '{"error": {"message": "model m not served"}}')]

    with pytest.raises(StackError, match="failed its readiness check: POST returned 400"):
        ChatSucceeds(base, model="m", component="router").wait(None, timeout=20)
    assert handler.calls["/v1/chat/completions"] == 1


def test_log_matches_line(tmp_path):
    log_path = tmp_path / "ready.log"
    script = "import time; print('starting', flush=True); time.sleep(0.5); print('listening on 1234', flush=True); time.sleep(60)"
    with ManagedProcess("logger", [sys.executable, "-c", script], env=None, log_path=log_path) as child:
        LogMatches(r"listening on \d+").wait(child, timeout=10)
        assert child.alive()


def test_grpc_healthy_against_fake():
    from fake_scheduler import FakeScheduler

    with FakeScheduler() as fake:
        GrpcHealthy(fake.address).wait(None, timeout=10)
    assert fake.unary_calls == ["HealthCheck"]


def test_all_of_shares_timeout(http_server):
    base, handler = http_server
    handler.script["/health"] = [(200, "{}")]
    handler.script["/ready"] = [(503, "{}")]

    started = time.monotonic()
    with pytest.raises(WaitTimeout, match="/ready"):
        AllOf([HttpOk(base + "/health"), HttpOk(base + "/ready")], component="server").wait(None, timeout=1.0)
    assert time.monotonic() - started < 3
