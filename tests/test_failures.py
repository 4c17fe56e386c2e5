"""Failure handling: dying components, signals, bad flags and secrets, with real processes.

Every test that starts the stack gets its own cache folder (HARNESS_CACHE_DIR) whose
``routers`` and ``tiktoken`` folders link to the real cache, so router venvs are reused but
the run registry is private. Each child process inherits HARNESS_CACHE_DIR, so a process
whose environment names that folder is one this test started: ``leftovers`` finds them.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.fixture import cache_root

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
FAKE_HF_TOKEN = "hf_FAKEfakeFAKEfakeFAKEfake0123456789"
FAKE_BEARER = "sk-FAKEbearerFAKEbearer0123"

CASES_YAML = """\
defaults:
  model: google/gemma-3-270m-it
cases:
  - id: long-stream
    description: A streamed answer long enough to be cut in the middle.
    messages:
      - role: user
        content: Why sky is blue?
    sampling:
      temperature: 0
      max_tokens: 400
      ignore_eos: true
    stream: true
    modes: [grpc]
  - id: after-long-stream
    description: A short case that runs after the long one.
    messages:
      - role: user
        content: Why sky is blue?
    sampling:
      temperature: 0
      max_tokens: 2
    modes: [http, grpc]
"""

# A case whose message carries credentials, so they reach the router, the wire and the captures.
SECRET_CASE_YAML = f"""\
defaults:
  model: google/gemma-3-270m-it
cases:
  - id: secret-in-message
    messages:
      - role: user
        content: "My token is {FAKE_HF_TOKEN} and the header is Authorization: Bearer {FAKE_BEARER}"
    sampling:
      temperature: 0
      max_tokens: 2
    modes: [http, grpc, direct]
"""


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    from harness.fixture import build_fixture

    return build_fixture()


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """Return a private cache folder that reuses the real router venvs and Harmony vocabulary."""
    real = cache_root()
    private = tmp_path / "cache"
    private.mkdir()
    for name in ("routers", "tiktoken"):
        (real / name).mkdir(parents=True, exist_ok=True)
        (private / name).symlink_to(real / name)
    return private


@pytest.fixture
def case_file(tmp_path: Path) -> Path:
    path = tmp_path / "cases.yaml"
    path.write_text(CASES_YAML)
    return path


def child_env(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["HARNESS_CACHE_DIR"] = str(cache)
    env.pop("HARNESS_START_TIMEOUT_S", None)
    env.update(extra)
    return env


def leftovers(cache: Path, exclude: tuple[int, ...] = ()) -> list[str]:
    """Return "pid command" of every live, non-zombie process whose environment names ``cache``."""
    marker = f"HARNESS_CACHE_DIR={cache}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            continue
        if marker in environ.split(b"\0"):
            found.append(f"{entry.name} {command[:120]}")
    return found


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def wait_no_leftovers(cache: Path, timeout: float = 20.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while leftovers(cache) and time.monotonic() < deadline:
        time.sleep(0.2)
    return leftovers(cache)


def harness_run(*args: str) -> list[str]:
    return [PYTHON, "-m", "harness", "run", *args]


def pytest_cases(*args: str) -> list[str]:
    # The case file lies outside the repository, so conftest.py is loaded as a named plugin.
    return [PYTHON, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", *args]


class Output:
    """A child process whose stdout and stderr go to one file that the test can poll."""

    def __init__(self, argv: list[str], env: dict[str, str], path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.process = subprocess.Popen(argv, env=env, cwd=REPO_ROOT, stdout=self.file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)

    def text(self) -> str:
        return self.path.read_text(errors="replace")

    def wait_for_line(self, pattern: str, timeout: float) -> None:
        regex = re.compile(pattern)

        def seen() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"exited with {self.process.returncode} before /{pattern}/:\n{self.text()[-3000:]}")
            return bool(regex.search(self.text()))

        wait_until(seen, timeout, f"/{pattern}/ in {self.path}")

    def finish(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.file.close()


# -- a component dies while a streamed case replays ---------------------------------------------


def _kill_when_decoding(session, component: str, errors: list[BaseException]) -> threading.Thread:
    """Start a thread that SIGKILLs ``component``'s group once the engine decodes the long case."""
    stack = session.stack()
    process = next(p for p in stack._processes if p.name == component)
    engine_log = stack.log_paths()["engine"]
    queued_before = engine_log.read_text().count(" queued: ")

    def kill() -> None:
        try:
            wait_until(lambda: engine_log.read_text().count(" queued: ") > queued_before, 120, "the long request")
            time.sleep(1.5)
            os.killpg(process.pid, signal.SIGKILL)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
@pytest.mark.parametrize("component,role", [("router-grpc", "router"), ("engine", "engine")])
def test_component_killed_mid_stream(component, role, fixture_dir, cache_dir, case_file, tmp_path, monkeypatch):
    from harness.findings import Kind, Layer
    from harness.run import Session, SessionConfig, select_cases
    from harness.stacks.process import _group_members

    monkeypatch.setenv("HARNESS_CACHE_DIR", str(cache_dir))
    long_case, short_case = select_cases([case_file], None)
    session = Session(SessionConfig(model_dir=fixture_dir, reports_dir=tmp_path / "reports"))
    try:
        errors: list[BaseException] = []
        killer = _kill_when_decoding(session, component, errors)
        pgids = [process.pid for process in session.stack()._processes]

        started = time.monotonic()
        result = session.diagnose(long_case)
        killer.join(5)
        assert not errors, errors
        capture = result.captures["grpc"]
        assert capture.error is not None
        assert capture.error.startswith(f"{role} died: {component} (pid ")
        assert "exited with code -9 (killed by SIGKILL)" in capture.error
        assert "last lines of" in capture.error
        # 400 tokens take far longer than this; the case ended when the component died.
        assert time.monotonic() - started < 60
        transport = [f for f in result.findings if f.kind == Kind.REQUEST_FAILED and f.layer == Layer.TRANSPORT]
        assert any(f"{role} died" in finding.explanation for finding in transport)

        started = time.monotonic()
        later = session.diagnose(short_case)
        assert time.monotonic() - started < 10
        assert set(later.captures) == {"http", "grpc"}
        for later_capture in later.captures.values():
            assert later_capture.error.startswith(f"not sent: {role} died: {component}")
        assert session.stack_died.startswith(f"{role} died")
    finally:
        session.close()
    assert wait_no_leftovers(cache_dir) == []
    for pgid in pgids:
        assert _group_members(pgid) == [], f"process group {pgid} still has members"
    report = (tmp_path / "reports" / session.config.run_id / "report.json").read_text()
    assert f"{role} died" in report


# -- signals to the harness ---------------------------------------------------------------------


SIGNAL_CASES = [
    # (entry point, phase, signal)
    ("run", "start", signal.SIGINT),
    ("run", "replay", signal.SIGTERM),
    ("pytest", "start", signal.SIGTERM),
    ("pytest", "replay", signal.SIGINT),
]


@pytest.mark.slow
@pytest.mark.parametrize("entry,phase,signum", SIGNAL_CASES, ids=[f"{e}-{p}-{s.name}" for e, p, s in SIGNAL_CASES])
def test_signal_stops_every_child(entry, phase, signum, fixture_dir, cache_dir, case_file, tmp_path):
    common = [str(case_file), "-k", "long-stream", "--model-dir", str(fixture_dir),
              "--reports-dir", str(tmp_path / "reports")]
    if entry == "run":
        argv = harness_run(*common)
    else:
        argv = pytest_cases(*common, "-o", "log_cli=true", "--log-cli-level=INFO")
    output = Output(argv, child_env(cache_dir), tmp_path / "output.txt")
    try:
        if phase == "start":
            output.wait_for_line(r"started engine \(pid", 120)
        else:
            output.wait_for_line(r"case long-stream: replaying in grpc mode", 300)
            time.sleep(1.5)
        assert leftovers(cache_dir, exclude=(output.process.pid,))
        output.process.send_signal(signum)
        code = output.finish(timeout=90)
    finally:
        if output.process.poll() is None:
            output.process.kill()
    text = output.text()
    if entry == "run":
        assert code == 128 + signum
        assert f"interrupted by {signum.name}" in text
        assert "Traceback" not in text
    else:
        assert code == pytest.ExitCode.INTERRUPTED
        assert f"harness: interrupted by {signum.name}; stopped the stack" in text
    assert wait_no_leftovers(cache_dir) == []


@pytest.mark.slow
def test_next_run_reaps_killed_run(fixture_dir, cache_dir, case_file, tmp_path):
    first = Output(harness_run(str(case_file), "--model-dir", str(fixture_dir), "--reports-dir", str(tmp_path / "r1")),
                   child_env(cache_dir), tmp_path / "first.txt")
    first.wait_for_line(r"started engine \(pid", 120)
    first.process.kill()
    first.finish(timeout=10)
    orphans = leftovers(cache_dir)
    assert orphans, "the engine should outlive the killed harness"

    # The second run fails fast (its engine cannot be ready within 0.5 s), after reaping.
    second = subprocess.run(
        harness_run(str(case_file), "--model-dir", str(fixture_dir), "--reports-dir", str(tmp_path / "r2")),
        env=child_env(cache_dir, HARNESS_START_TIMEOUT_S="0.5"), cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=120)
    assert re.search(r"removed [1-9]\d* process groups left by earlier runs", second.stderr), second.stderr
    assert second.returncode == 2
    assert wait_no_leftovers(cache_dir) == []


# -- one line and exit code 2 ---------------------------------------------------------------------


def _first_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def incomplete_model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "incomplete-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}\n")
    return folder


USAGE_CASES = {
    "missing-model-dir": (["--model-dir", "/nonexistent"], "--model-dir: model folder not found: /nonexistent"),
    "incomplete-model-dir": (["--model-dir", "{incomplete}"], "is incomplete: tokenizer.json is missing"),
    "docker-without-engine": (["--stack", "docker"], "--stack docker: no Docker engine reachable"),
    "invalid-router": (["--router", "vllm==1.0"], "--router: invalid router release 'vllm==1.0'"),
}


def _usage_args(args: list[str], incomplete: Path, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    args = [arg.replace("{incomplete}", str(incomplete)) for arg in args]
    # No engine listens on this socket, so the Docker client fails at once.
    env = child_env(tmp_path / "cache", DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock")
    return args, env


@pytest.mark.parametrize("name", list(USAGE_CASES))
def test_run_usage_error_one_line(name, case_file, incomplete_model_dir, tmp_path):
    args, expected = USAGE_CASES[name]
    args, env = _usage_args(args, incomplete_model_dir, tmp_path)
    result = subprocess.run(harness_run(str(case_file), *args, "--reports-dir", str(tmp_path / "r")),
                            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert expected in _first_error_line(result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", list(USAGE_CASES))
def test_pytest_usage_error(name, case_file, incomplete_model_dir, tmp_path):
    args, expected = USAGE_CASES[name]
    args, env = _usage_args(args, incomplete_model_dir, tmp_path)
    result = subprocess.run(pytest_cases(str(case_file), *args, "--reports-dir", str(tmp_path / "r")),
                            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR: ")]
    assert len(errors) == 1, result.stderr
    assert expected in errors[0]
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.slow
def test_never_healthy_run_one_line(fixture_dir, cache_dir, case_file, tmp_path):
    result = subprocess.run(
        harness_run(str(case_file), "-k", "after", "--model-dir", str(fixture_dir), "--reports-dir", str(tmp_path)),
        env=child_env(cache_dir, HARNESS_START_TIMEOUT_S="0.5"), cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 2
    line = _first_error_line(result.stderr)
    assert re.match(r"error: engine not ready at http://127\.0\.0\.1:\d+/health after 0\.\d s \(last check: ", line)
    assert "--- last lines of the log" in result.stderr
    assert "Traceback" not in result.stderr
    assert wait_no_leftovers(cache_dir) == []


@pytest.mark.slow
def test_never_healthy_pytest_one_line_per_item(fixture_dir, cache_dir, case_file, tmp_path):
    result = subprocess.run(
        pytest_cases(str(case_file), "--model-dir", str(fixture_dir), "--reports-dir", str(tmp_path), "-rf"),
        env=child_env(cache_dir, HARNESS_START_TIMEOUT_S="0.5"), cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED
    assert len(re.findall(r"^FAILED .*", result.stdout, re.MULTILINE)) == 3, result.stdout
    # Each item's failure section is the one line.
    failure_lines = re.findall(r"^stack failed: .*", result.stdout, re.MULTILINE)
    assert len(failure_lines) == 3, result.stdout
    for line in failure_lines:
        assert line.startswith("stack failed: engine not ready at http://127.0.0.1:")
    assert "harness: the stack failed: engine not ready" in result.stdout
    assert "Traceback" not in result.stdout
    assert wait_no_leftovers(cache_dir) == []


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["run", "pytest"])
def test_unknown_router_release_one_line(entry, case_file, cache_dir, incomplete_model_dir, fixture_dir, tmp_path):
    args = [str(case_file), "-k", "after", "--router", "smg==0.0.0.1", "--model-dir", str(fixture_dir),
            "--reports-dir", str(tmp_path / "r")]
    argv = harness_run(*args) if entry == "run" else pytest_cases(*args, "-rf")
    result = subprocess.run(argv, env=child_env(cache_dir), cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600)
    expected = "router release smg==0.0.0.1 not found on the package index"
    if entry == "run":
        assert result.returncode == 2
        assert _first_error_line(result.stderr) == f"error: {expected}"
        assert "Traceback" not in result.stderr
    else:
        assert result.returncode == pytest.ExitCode.TESTS_FAILED
        assert len(re.findall(r"^FAILED .*", result.stdout, re.MULTILINE)) == 2, result.stdout
        failure_lines = re.findall(r"^stack failed: .*", result.stdout, re.MULTILINE)
        assert failure_lines == [f"stack failed: {expected} (the full error is printed at the end of the session)"] * 2
    assert wait_no_leftovers(cache_dir) == []


@pytest.mark.slow
def test_port_taken_retries_then_one_line(fixture_dir, cache_dir, tmp_path, monkeypatch):
    import harness.stacks.cpu as cpu
    from harness.stacks.base import StackError

    monkeypatch.setenv("HARNESS_CACHE_DIR", str(cache_dir))
    monkeypatch.setattr(cpu, "START_ATTEMPTS", 2)
    # The engine needs two distinct ports; both are held by listening sockets of this test.
    holders = [socket.socket(), socket.socket()]
    try:
        for holder in holders:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
        taken = itertools.cycle([holder.getsockname()[1] for holder in holders])
        monkeypatch.setattr(cpu, "free_port", lambda: next(taken))
        stack = cpu.CpuStack(model_dir=fixture_dir, router="sglang-router==0.3.2", run_dir=tmp_path / "run")
        with pytest.raises(StackError) as raised:
            stack.__enter__()
    finally:
        for holder in holders:
            holder.close()
    message = str(raised.value)
    assert message.splitlines()[0] == (
        "engine could not bind its port in 2 attempts: another process took each free port first; "
        "last lines of its log:")
    assert "cannot bind" in message
    log_text = (tmp_path / "run" / "logs" / "engine.log").read_text()
    assert log_text.count("starting engine") == 2
    assert wait_no_leftovers(cache_dir) == []


def test_gated_model_without_token_one_line(case_file, tmp_path, monkeypatch, capsys):
    from harness import run
    from harness.stacks.base import StackError
    from harness.stacks.docker import gated_model_message

    log_tail = "huggingface_hub.errors.GatedRepoError: 401 Client Error.\nCannot access gated repo for url x\n"
    message = gated_model_message(log_tail, "google/gemma-3-270m-it", hf_token_set=False)
    assert message is not None
    assert "\n" not in message
    assert "set HF_TOKEN" in message

    # The Docker stack raises it from its start; the run turns it into one line and exit code 2.
    monkeypatch.setattr(run.Session, "preflight", lambda self: None)

    def fail_start(self):
        raise StackError(message)

    monkeypatch.setattr(run.Session, "_open_stack", fail_start)
    code = run.main([str(case_file), "-k", "after", "--stack", "docker", "--reports-dir", str(tmp_path)])
    stderr = capsys.readouterr().err
    assert code == 2
    assert stderr.strip() == f"error: {message}"


def test_check_alive_names_role(tmp_path):
    from harness.stacks.base import StackError
    from harness.stacks.cpu import CpuStack
    from harness.stacks.process import ManagedProcess

    stack = CpuStack(model_dir=tmp_path, router="sglang-router==0.3.2", run_dir=tmp_path)
    process = ManagedProcess("router-http", [PYTHON, "-c", "print('bye'); raise SystemExit(3)"], env=None,
                             log_path=tmp_path / "router-http.log")
    stack._processes.append(process)
    process.start()
    process.wait(30)
    with pytest.raises(StackError) as raised:
        stack.check_alive()
    first_line = str(raised.value).splitlines()[0]
    assert first_line.startswith(f"router died: router-http (pid {process.pid}) exited with code 3; last lines of ")
    assert "bye" in str(raised.value)
    process.stop()


# -- secrets ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_secrets_absent_from_every_output(fixture_dir, cache_dir, tmp_path):
    case_path = tmp_path / "secret.yaml"
    case_path.write_text(SECRET_CASE_YAML)
    reports = tmp_path / "reports"
    junit = tmp_path / "junit.xml"
    env = child_env(cache_dir, HF_TOKEN=FAKE_HF_TOKEN, HUGGING_FACE_HUB_TOKEN=FAKE_HF_TOKEN)
    result = subprocess.run(
        pytest_cases(str(case_path), "--model-dir", str(fixture_dir), "--reports-dir", str(reports),
                     f"--junitxml={junit}", "-o", "junit_logging=all", "-o", "log_level=DEBUG"),
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode in (0, 1), result.stdout[-3000:] + result.stderr[-3000:]

    files = [path for path in reports.rglob("*") if path.is_file()] + [junit]
    names = {path.name for path in files}
    assert {"report.json", "report.html", "wire.jsonl", "engine.log", "router-grpc.log"} <= names
    assert any(path.parent.name == "captures" for path in files)
    # The message did reach the captures (masked), so the check below is not vacuous.
    capture = next(p for p in files if p.name == "secret-in-message.grpc.json").read_text()
    assert "hf_***" in capture
    assert "Bearer ***" in capture
    for path in files:
        text = path.read_text(errors="replace")
        assert FAKE_HF_TOKEN not in text, path
        assert FAKE_BEARER not in text, path
    assert FAKE_HF_TOKEN not in result.stdout + result.stderr
    assert wait_no_leftovers(cache_dir) == []
