"""Child processes that cannot outlive the harness: process groups, a run registry, a reaper.

Each ``ManagedProcess`` starts its child as the leader of a new process group, so stopping
it also stops every grandchild (a router's worker threads live in one process, but an
engine or a shell wrapper may fork). Every started group is recorded under
``<cache>/runs/<run-id>/pids/<pgid>``, and the run id is put in the child's environment as
``HARNESS_RUN_ID``. When a harness process dies without cleaning up (SIGKILL, a crashed CI
job), the next run calls ``reap_leftovers()``, which kills the groups of runs whose owner
process is gone.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from pathlib import Path
from typing import Mapping, Sequence

from harness.fixture import cache_root
from harness.lifecycle import StartStop

log = logging.getLogger(__name__)

RUN_ID_ENV = "HARNESS_RUN_ID"

_run_lock = threading.Lock()
_run_id: str | None = None


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago (bind to port 0 and close).

    NOTE: another process can take the port between this call and its use. A caller that
    starts a server on it should treat "address in use" as a reason to pick a new port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def runs_root() -> Path:
    """Return the folder holding one subfolder per harness run that started processes."""
    return cache_root() / "runs"


def current_run_id() -> str:
    """Return this harness process's run id, registering the run on first use."""
    global _run_id
    with _run_lock:
        # Register again when the registry moved (HARNESS_CACHE_DIR changed) or was removed.
        if _run_id is not None and not (runs_root() / _run_id / "pids").is_dir():
            _run_id = None
        if _run_id is None:
            run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
            run_dir = runs_root() / run_id
            (run_dir / "pids").mkdir(parents=True, exist_ok=True)
            # The owner's start time distinguishes a live owner from a later process that reused its pid.
            (run_dir / "owner").write_text(f"{os.getpid()} {_process_start_time(os.getpid())}\n")
            atexit.register(_remove_run_dir_if_empty, run_dir)
            _run_id = run_id
        return _run_id


def current_run_dir() -> Path:
    return runs_root() / current_run_id()


def _remove_run_dir_if_empty(run_dir: Path) -> None:
    pids_dir = run_dir / "pids"
    if pids_dir.is_dir() and any(pids_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)


def _process_start_time(pid: int) -> str | None:
    """Return field 22 of /proc/PID/stat (start time in clock ticks), or None if pid is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces.
    fields_after_name = stat.rsplit(")", 1)[1].split()
    return fields_after_name[19]


def _group_members(pgid: int) -> list[int]:
    """Return the pids of the non-zombie processes in process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields_after_name = stat.rsplit(")", 1)[1].split()
        state, process_group = fields_after_name[0], int(fields_after_name[2])
        # Zombies cannot be killed; when PID 1 does not reap orphans they stay listed.
        if process_group == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def _environ_has_run_id(pid: int, run_id: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{RUN_ID_ENV}={run_id}".encode() in environ.split(b"\0")


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def reap_leftovers() -> list[int]:
    """Kill the process groups of earlier runs whose owner is dead; return the killed pgids.

    A group is killed only when its leader still has the start time recorded at launch, or
    one of its live members still carries the dead run's ``HARNESS_RUN_ID``, so a pgid that
    the kernel reused for an unrelated process survives. The run's records are removed
    either way.
    """
    root = runs_root()
    if not root.is_dir():
        return []
    own_run = _run_id
    killed: list[int] = []
    for run_dir in sorted(root.iterdir()):
        if not run_dir.is_dir() or run_dir.name == own_run:
            continue
        if _owner_alive(run_dir):
            continue
        for record in sorted((run_dir / "pids").glob("*")):
            try:
                pgid = int(record.name)
            except ValueError:
                continue
            name, _, recorded_start = record.read_text().partition("\n")
            recorded_start = recorded_start.strip()
            members = _group_members(pgid)
            # Routers overwrite their environment with their process title, so the leader's
            # recorded start time is the first proof that the group is still the one started.
            leader_is_ours = bool(recorded_start) and _process_start_time(pgid) == recorded_start
            if leader_is_ours or any(_environ_has_run_id(pid, run_dir.name) for pid in members):
                log.warning("killing leftover process group %d (%s) of run %s", pgid, name.strip(), run_dir.name)
                _kill_group(pgid, signal.SIGKILL)
                killed.append(pgid)
        shutil.rmtree(run_dir, ignore_errors=True)
    return killed


def _owner_alive(run_dir: Path) -> bool:
    try:
        pid_text, start_time = (run_dir / "owner").read_text().split()
    except (OSError, ValueError):
        # A run folder without a readable owner file is treated as dead; its groups are
        # still only killed when their environment names the run.
        return False
    return _process_start_time(int(pid_text)) == start_time


class ManagedProcess(StartStop):
    """A child process in its own process group, logging to a file, stopped as a group.

    ``env`` contains variables set on top of the current environment (None values remove a
    variable). Use it as a context manager: the group is stopped on exit and when the
    start itself fails.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str | None] | None,
        log_path: Path | str,
        cwd: Path | str | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(arg) for arg in argv]
        self.env = dict(env or {})
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self._record: Path | None = None

    def __repr__(self) -> str:
        return f"ManagedProcess({self.name!r}, pid={self.pid}, returncode={self.returncode})"

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def returncode(self) -> int | None:
        """Return the exit code (negative: killed by that signal), or None while running."""
        return self.popen.poll() if self.popen else None

    def start(self) -> None:
        if self.popen is not None:
            raise RuntimeError(f"process {self.name} was already started")
        run_id = current_run_id()
        env = dict(os.environ)
        for key, value in self.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        env[RUN_ID_ENV] = run_id

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            log_file.write(f"--- {time.strftime('%H:%M:%S')} starting {self.name}: {' '.join(self.argv)}\n".encode())
            log_file.flush()
            try:
                self.popen = subprocess.Popen(
                    self.argv,
                    env=env,
                    cwd=self.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as error:
                raise OSError(f"cannot start {self.name} ({self.argv[0]}): {error}") from error

        # With start_new_session the child's pid is its process group id. The record keeps
        # the leader's start time, so a later run can tell it from a reused pid.
        try:
            self._record = current_run_dir() / "pids" / str(self.popen.pid)
            self._record.write_text(f"{self.name}\n{_process_start_time(self.popen.pid) or ''}\n")
        except BaseException:
            self.stop(timeout=5.0)
            raise
        log.info("started %s (pid %d), log: %s", self.name, self.popen.pid, self.log_path)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def group_alive(self) -> bool:
        """Return True while any non-zombie process of the group is left, leader or not."""
        return self.popen is not None and bool(_group_members(self.popen.pid))

    def wait(self, timeout: float | None = None) -> int:
        if self.popen is None:
            raise RuntimeError(f"process {self.name} was never started")
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Send SIGTERM to the group, SIGKILL after ``timeout`` s; return the leader's exit code.

        Safe to call twice and on a process that never started. Waits for the whole group,
        so a grandchild that ignores SIGTERM is killed too.
        """
        if self.popen is None:
            return None
        pgid = self.popen.pid
        if self.group_alive() or self.popen.poll() is None:
            _kill_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                self.popen.poll()
                if not self.group_alive():
                    break
                time.sleep(0.05)
            else:
                log.warning("%s (pgid %d) did not stop within %.1f s of SIGTERM; sending SIGKILL",
                            self.name, pgid, timeout)
                _kill_group(pgid, signal.SIGKILL)
        code = self.popen.wait()
        # A SIGKILLed grandchild disappears (or turns zombie) shortly after the signal.
        for _ in range(100):
            if not self.group_alive():
                break
            time.sleep(0.02)
        if self._record is not None:
            self._record.unlink(missing_ok=True)
            self._record = None
        return code

    def log_tail(self, lines: int = 40) -> str:
        """Return the last ``lines`` lines of the log file, or "" when it does not exist."""
        try:
            with open(self.log_path, "rb") as log_file:
                tail = deque(log_file, maxlen=lines)
        except FileNotFoundError:
            return ""
        return b"".join(tail).decode("utf-8", errors="replace")
