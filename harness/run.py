"""A diagnosis session: pick a stack, replay cases, diff them, write the report.

The pytest plugin (conftest.py) and ``python -m harness run`` both drive a ``Session``, so
the two entry points cannot drift apart: same stack selection, same replay, same diff,
same report files.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import json
import logging
import shutil
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from harness.cases import Case, CaseError, load_cases
from harness.fixture import REPO_ROOT, FixtureError
from harness.stacks.base import Stack, StackError

log = logging.getLogger(__name__)

DEFAULT_CASES_DIR = REPO_ROOT / "cases"
DEFAULT_REPORTS_DIR = REPO_ROOT / "reports"
STACK_CHOICES = ("cpu", "docker", "auto")


# Exit codes of ``python -m harness run``. pytest keeps its own: 1 failed items (findings or a
# stack that failed, one line per item), 2 interrupted, 4 usage error.
EXIT_FINDINGS = 1
EXIT_ERROR = 2
# 128 + the signal number, as a shell reports a process killed by that signal.
EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM


class UsageError(RuntimeError):
    """A flag, path or environment problem; the message is one line that names it."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived; raised in the main thread so every ``finally`` runs."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"interrupted by {signal_name}")
        self.signal_name = signal_name


_last_signal: str | None = None


def last_interrupt_signal() -> str | None:
    """Return the name of the last signal that raised Interrupted in this process, or None."""
    return _last_signal


def _raise_interrupted(signum: int, _frame: object) -> None:
    global _last_signal
    _last_signal = signal.Signals(signum).name
    # Later signals are ignored, so a second Ctrl-C cannot cut the stack's shutdown short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)


def install_interrupt_handlers() -> dict[int, Any]:
    """Make SIGINT and SIGTERM raise Interrupted in the main thread; return the old handlers."""
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, _raise_interrupted)
    return previous


def restore_handlers(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM while the stack stops and the report is written."""
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        restore_handlers(previous)


class _RedactingRecordFactory:
    """A log record factory that masks credentials in the harness's own log messages.

    It covers every handler at once (the terminal, pytest's log capture and the JUnit XML),
    because the message is masked when the record is created.
    """

    def __init__(self, factory: Any) -> None:
        self.factory = factory

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.factory(*args, **kwargs)
        if record.name.startswith("harness"):
            from harness.report import redact

            message = record.getMessage()
            masked = redact(message)
            if masked != message:
                record.msg, record.args = masked, None
        return record


def install_log_redaction() -> None:
    """Mask credentials in every record the harness logs; calling it twice is harmless."""
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _RedactingRecordFactory):
        logging.setLogRecordFactory(_RedactingRecordFactory(factory))


@dataclass
class SessionConfig:
    stack: str = "cpu"
    router: str = "sglang-router==0.3.2"
    model_dir: Path | None = None
    reports_dir: Path = DEFAULT_REPORTS_DIR
    run_id: str = field(default_factory=lambda: new_run_id())


@dataclass
class Timings:
    """Wall time of a session's steps in seconds, written to timings.json in the run folder."""

    # From the first case until the stack served chat requests in every mode (fixture
    # build and router install included when they had to run).
    stack_start_s: float | None = None
    # Unix time when the stack was ready; requests the engine logged before it were start-up checks.
    stack_ready_at: float | None = None
    # Per case id: reference, replay in every mode and diff.
    cases: dict[str, float] = field(default_factory=dict)
    # Stopping the stack.
    stack_stop_s: float | None = None
    # Writing report.json, report.html and the captures.
    report_s: float | None = None


def new_run_id() -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid.uuid4().hex[:6]}"


def docker_engine_available() -> tuple[bool, str]:
    """Return whether a Docker engine responds to a ping, and the reason when it does not."""
    try:
        import docker

        client = docker.from_env(timeout=5)
        client.ping()
    except Exception as error:  # noqa: BLE001 - any failure means "no usable engine"
        return False, f"no Docker engine reachable ({type(error).__name__}: {error})"
    return True, ""


def gpu_available() -> tuple[bool, str]:
    if shutil.which("nvidia-smi") is None:
        return False, "no GPU: nvidia-smi is not on PATH"
    return True, ""


def resolve_stack_name(requested: str) -> str:
    """Turn ``auto`` into ``docker`` on a GPU box with a Docker engine, otherwise ``cpu``."""
    if requested not in STACK_CHOICES:
        raise UsageError(f"--stack must be one of {', '.join(STACK_CHOICES)}, got {requested!r}")
    if requested != "auto":
        return requested
    has_docker, _ = docker_engine_available()
    has_gpu, _ = gpu_available()
    return "docker" if has_docker and has_gpu else "cpu"


class Session:
    """One stack shared by every case of a run, started on first use and stopped at the end."""

    def __init__(self, config: SessionConfig):
        self.config = config
        self.stack_name = resolve_stack_name(config.stack)
        self.run_dir = config.reports_dir / config.run_id
        self.results: list[Any] = []
        self.results_by_case: dict[str, Any] = {}
        self._stack: Stack | None = None
        self._start_error: BaseException | None = None
        self._model_dir: Path | None = None
        self._tokenizer = None
        # Set once a component of the started stack died: every later case fails fast with it.
        self._stack_died: str | None = None
        self.timings = Timings()
        self.preflight()

    def preflight(self) -> None:
        """Raise UsageError for a flag that cannot work, before anything starts.

        Checks the router spec, the model folder when one is given, and that a Docker engine
        replies to a ping when the Docker stack was chosen.
        """
        from harness.fixture import check_model_dir
        from harness.stacks.routers import RouterRelease

        try:
            RouterRelease.parse(self.config.router)
        except ValueError as error:
            raise UsageError(f"--router: {error}") from None
        if self.config.model_dir is not None:
            try:
                check_model_dir(self.config.model_dir)
            except FixtureError as error:
                raise UsageError(f"--model-dir: {error}") from None
        if self.stack_name == "docker":
            from harness.stacks.docker import connect

            try:
                connect()
            except StackError as error:
                raise UsageError(f"--stack docker: {error}") from None

    @property
    def model_dir(self) -> Path:
        """Return the folder the reference reads the tokenizer, template and configs from.

        Without a configured folder, the CPU stack uses the Gemma fixture (built if needed).
        The Docker stack uses the hub snapshot its servers downloaded into the mounted HF
        cache, so the reference and the servers read the same files. There, call this only
        after the stack started.
        """
        if self._model_dir is None:
            from harness.fixture import SERVED_MODEL_NAME, build_fixture, check_model_dir

            if self.config.model_dir is not None:
                check_model_dir(self.config.model_dir)
                self._model_dir = self.config.model_dir
            elif self.stack_name == "cpu":
                self._model_dir = build_fixture()
            else:
                from huggingface_hub import snapshot_download

                self._model_dir = Path(snapshot_download(SERVED_MODEL_NAME, local_files_only=True))
        return self._model_dir

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from harness.reference import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_dir)
        return self._tokenizer

    def stack(self) -> Stack:
        """Start the stack on first call; later calls return it, or re-raise its start error."""
        if self._start_error is not None:
            raise self._start_error
        if self._stack is None:
            started = time.monotonic()
            try:
                self._stack = self._open_stack()
                self.timings.stack_ready_at = time.time()
            except BaseException as error:
                self._start_error = error
                raise
            finally:
                self.timings.stack_start_s = time.monotonic() - started
        return self._stack

    def _open_stack(self) -> Stack:
        from harness.stacks.process import reap_leftovers

        # Before anything else, so a run that fails early still removes what a killed run left.
        reaped = reap_leftovers()
        if reaped:
            log.warning("removed %d process groups left by earlier runs: %s", len(reaped), reaped)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.stack_name == "cpu":
            from harness.stacks.cpu import CpuStack

            stack: Stack = CpuStack(model_dir=self.model_dir, router=self.config.router, run_dir=self.run_dir)
        else:
            from harness.stacks.docker import DockerStack

            stack = DockerStack(router=self.config.router, run_dir=self.run_dir, model_dir=self.config.model_dir)
        return stack.__enter__()

    def diagnose(self, case: Case):
        """Replay one case on the stack and return its CaseResult (findings included)."""
        from harness.diff import CaseResult, compare
        from harness.reference import build_reference
        from harness.replay import replay_case

        from harness.replay import failed_captures

        stack = self.stack()
        started = time.monotonic()
        reference = build_reference(case, self.model_dir, tokenizer=self.tokenizer)
        if self._stack_died is not None:
            captures = failed_captures(case, self._stack_died)
        else:
            captures = replay_case(case, stack, reference, self.tokenizer)
            self._stack_died = stack_death(stack)
        findings = compare(case, reference, captures, self.tokenizer)
        result = CaseResult(case=case, reference=reference, captures=captures, findings=findings)
        self.results.append(result)
        self.timings.cases[case.id] = time.monotonic() - started
        return result

    @property
    def start_error(self) -> BaseException | None:
        """Return the error the stack's start raised, or None."""
        return self._start_error

    @property
    def stack_died(self) -> str | None:
        """Return why the stack stopped working mid-run (component, exit code, log tail), or None."""
        return self._stack_died

    def close(self) -> dict[str, Path]:
        """Stop the stack and write the report files; return them by name.

        Credentials are masked in the component logs and the wire records too, because those
        files are written by the components themselves.
        """
        if self._stack is not None:
            started = time.monotonic()
            self._stack.__exit__(None, None, None)
            self.timings.stack_stop_s = time.monotonic() - started
        paths: dict[str, Path] = {}
        if self.results:
            from harness.report import write_report

            stack_info: dict[str, Any] = {"stack": self.stack_name, "router": self.config.router}
            if self._stack is not None:
                info = self._stack.info
                stack_info.update(vars(info))
                stack_info["logs"] = {name: str(path) for name, path in self._stack.log_paths().items()}
            if self._stack_died is not None:
                stack_info["died"] = self._stack_died
            started = time.monotonic()
            paths = write_report(self.run_dir, self.results, stack_info)
            self.timings.report_s = time.monotonic() - started
        if self.run_dir.is_dir():
            redact_files(self.run_dir)
            (self.run_dir / "timings.json").write_text(json.dumps(vars(self.timings), indent=2) + "\n")
        return paths


def stack_death(stack: Stack) -> str | None:
    """Return the stack's StackError message when a component has exited, else None."""
    try:
        stack.check_alive()
    except StackError as error:
        return str(error)
    return None


# Files the components write themselves, which therefore never passed through ``redact``.
_COMPONENT_FILE_PATTERNS = ("logs/*.log", "*.jsonl")


def redact_files(run_dir: Path) -> list[Path]:
    """Mask credentials in the component logs and wire records of ``run_dir``; return changed files."""
    from harness.report import redact

    changed = []
    for pattern in _COMPONENT_FILE_PATTERNS:
        for path in sorted(run_dir.glob(pattern)):
            text = path.read_text(errors="replace")
            masked = redact(text)
            if masked != text:
                path.write_text(masked)
                changed.append(path)
    return changed


def select_cases(paths: list[Path], keyword: str | None) -> list[Case]:
    """Load every case from the given files or folders and keep those matching ``keyword``.

    ``keyword`` matches case ids and tags like a shell pattern, or as a plain substring.
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml")))
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"case path not found: {path}")
    if not files:
        raise UsageError(f"no case files (*.yaml) found in {', '.join(map(str, paths))}")

    cases: list[Case] = []
    for file in files:
        cases.extend(load_cases(file))
    if keyword:
        cases = [case for case in cases if _matches(case, keyword)]
    return cases


def _matches(case: Case, keyword: str) -> bool:
    names = [case.id, *case.tags]
    if any(char in keyword for char in "*?["):
        return any(fnmatch.fnmatch(name, keyword) for name in names)
    return any(keyword in name for name in names)


def main(argv: list[str]) -> int:
    """Run ``python -m harness run``: replay cases, print the diagnosis, write the report.

    Exit codes: 0 no finding of severity bug, 1 findings, 2 a usage or environment error
    (one line, then a log tail when a component failed), 130 or 143 interrupted by SIGINT
    or SIGTERM. Every case left after a component died fails fast with the same reason.
    """
    parser = argparse.ArgumentParser(prog="python -m harness run", description=__doc__)
    parser.add_argument("paths", nargs="*", type=Path, help="case files or folders (default: cases/)")
    parser.add_argument("--stack", default="cpu", help="cpu, docker or auto (default: cpu)")
    parser.add_argument("--router", default="sglang-router==0.3.2", help="router release, e.g. smg==1.13.0, or 'installed'")
    parser.add_argument("--model-dir", type=Path, help="HF-format model folder (default: the Gemma 3 fixture)")
    parser.add_argument("-k", dest="keyword", help="only cases whose id or tag matches (substring or glob)")
    parser.add_argument("--reports-dir", type=Path, default=DEFAULT_REPORTS_DIR, help="where reports/<run-id>/ goes")
    args = parser.parse_args(argv)

    install_log_redaction()
    previous_handlers = install_interrupt_handlers()
    try:
        return _run(args)
    except Interrupted as interrupt:
        # Raised before the session existed, or while it was closing.
        print(f"error: {interrupt}", file=sys.stderr)
        return EXIT_SIGTERM if interrupt.signal_name == "SIGTERM" else EXIT_SIGINT
    finally:
        restore_handlers(previous_handlers)


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from harness.report import render_terminal
    from harness.stacks.routers import RouterInstallError

    console = Console(stderr=False)
    try:
        cases = select_cases(args.paths or [DEFAULT_CASES_DIR], args.keyword)
        if not cases:
            raise UsageError(f"no case matches -k {args.keyword!r}")
        session = Session(
            SessionConfig(stack=args.stack, router=args.router, model_dir=args.model_dir, reports_dir=args.reports_dir)
        )
    except (UsageError, CaseError, FixtureError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR

    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("starting the stack", total=len(cases))
            for case in cases:
                progress.update(task, description=f"case {case.id}")
                session.diagnose(case)
                progress.advance(task)
    except (StackError, FixtureError, RouterInstallError) as error:
        first_line, _, rest = str(error).partition("\n")
        print(f"error: {first_line}", file=sys.stderr)
        if rest:
            print(rest, file=sys.stderr)
        with signals_ignored():
            session.close()
        return EXIT_ERROR
    except KeyboardInterrupt as interrupt:
        reason = str(interrupt) if isinstance(interrupt, Interrupted) else "interrupted by SIGINT"
        with signals_ignored():
            paths = session.close()
        where = f"; partial report: {paths['html']}" if paths else ""
        print(f"error: {reason}; stopped the stack{where}", file=sys.stderr)
        signal_name = interrupt.signal_name if isinstance(interrupt, Interrupted) else "SIGINT"
        return EXIT_SIGTERM if signal_name == "SIGTERM" else EXIT_SIGINT
    with signals_ignored():
        paths = session.close()

    render_terminal(session.results, console)
    if paths:
        console.print(f"report: {paths.get('html', session.run_dir)}")
    if session.stack_died is not None:
        first_line = session.stack_died.splitlines()[0]
        print(f"error: the stack stopped working during the run: {first_line}", file=sys.stderr)
        return EXIT_ERROR
    has_bugs = any(f.severity.value == "bug" for result in session.results for f in result.findings)
    return EXIT_FINDINGS if has_bugs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
