"""A diagnosis session: pick a stack, replay cases, diff them, write the report.

The pytest plugin (conftest.py) and ``python -m harness run`` both drive a ``Session``, so
the two entry points cannot drift apart: same stack selection, same replay, same diff,
same report files.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import logging
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.cases import Case, CaseError, load_cases
from harness.fixture import REPO_ROOT, FixtureError
from harness.stacks.base import Stack, StackError

log = logging.getLogger(__name__)

DEFAULT_CASES_DIR = REPO_ROOT / "cases"
DEFAULT_REPORTS_DIR = REPO_ROOT / "reports"
STACK_CHOICES = ("cpu", "docker", "auto")


class UsageError(RuntimeError):
    """A flag, path or environment problem; the message is one line that names it."""


@dataclass
class SessionConfig:
    stack: str = "cpu"
    router: str = "sglang-router==0.3.2"
    model_dir: Path | None = None
    reports_dir: Path = DEFAULT_REPORTS_DIR
    run_id: str = field(default_factory=lambda: new_run_id())


def new_run_id() -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid.uuid4().hex[:6]}"


def docker_engine_available() -> tuple[bool, str]:
    """Return whether a Docker engine answers, and why not when it does not."""
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

    @property
    def model_dir(self) -> Path:
        """Return the folder the reference reads the tokenizer, template and configs from.

        That is the configured folder; otherwise, on the CPU stack, the Gemma fixture (built
        if needed), and on the Docker stack the hub snapshot the servers downloaded into the
        mounted HF cache, so reference and servers read the same files. On the Docker stack
        without a configured folder, call this only after the stack started.
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
            try:
                self._stack = self._open_stack()
            except BaseException as error:
                self._start_error = error
                raise
        return self._stack

    def _open_stack(self) -> Stack:
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

        stack = self.stack()
        reference = build_reference(case, self.model_dir, tokenizer=self.tokenizer)
        captures = replay_case(case, stack, reference, self.tokenizer)
        stack.check_alive()
        findings = compare(case, reference, captures, self.tokenizer)
        result = CaseResult(case=case, reference=reference, captures=captures, findings=findings)
        self.results.append(result)
        return result

    def close(self) -> dict[str, Path]:
        """Stop the stack and write the report files; return them by name."""
        if self._stack is not None:
            self._stack.__exit__(None, None, None)
        if not self.results:
            return {}
        from harness.report import write_report

        stack_info: dict[str, Any] = {"stack": self.stack_name, "router": self.config.router}
        if self._stack is not None:
            info = self._stack.info
            stack_info.update(vars(info))
            stack_info["logs"] = {name: str(path) for name, path in self._stack.log_paths().items()}
        return write_report(self.run_dir, self.results, stack_info)


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
    """Run ``python -m harness run``: replay cases, print the diagnosis, write the report."""
    from rich.console import Console
    from rich.progress import Progress

    parser = argparse.ArgumentParser(prog="python -m harness run", description=__doc__)
    parser.add_argument("paths", nargs="*", type=Path, help="case files or folders (default: cases/)")
    parser.add_argument("--stack", default="cpu", help="cpu, docker or auto (default: cpu)")
    parser.add_argument("--router", default="sglang-router==0.3.2", help="router release, e.g. smg==1.13.0, or 'installed'")
    parser.add_argument("--model-dir", type=Path, help="HF-format model folder (default: the Gemma 3 fixture)")
    parser.add_argument("-k", dest="keyword", help="only cases whose id or tag matches (substring or glob)")
    parser.add_argument("--reports-dir", type=Path, default=DEFAULT_REPORTS_DIR, help="where reports/<run-id>/ goes")
    args = parser.parse_args(argv)

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
        return 2

    from harness.report import render_terminal

    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("starting the stack", total=len(cases))
            for case in cases:
                progress.update(task, description=f"case {case.id}")
                session.diagnose(case)
                progress.advance(task)
    except (StackError, FixtureError) as error:
        first_line, _, rest = str(error).partition("\n")
        print(f"error: {first_line}", file=sys.stderr)
        if rest:
            print(rest, file=sys.stderr)
        session.close()
        return 2
    except KeyboardInterrupt:
        print("interrupted: stopping the stack", file=sys.stderr)
        session.close()
        return 130
    paths = session.close()

    render_terminal(session.results, console)
    if paths:
        console.print(f"report: {paths.get('html', session.run_dir)}")
    has_bugs = any(f.severity.value == "bug" for result in session.results for f in result.findings)
    return 1 if has_bugs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
