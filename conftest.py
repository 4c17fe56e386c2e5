"""pytest plugin: YAML chat cases become test items, one per mode of each case.

``pytest -k gemma`` collects ``cases/*.yaml`` (see ``testpaths``), starts one stack for the
session on the first item, replays each case once in every mode it lists, and fails the
item of each mode that has findings of severity "bug". A failure shows the token-level
diff; the whole run is written to ``reports/<run-id>/`` when the session ends.

The harness's own tests (``pytest tests``) never collect YAML files outside ``cases/``
unless they are named on the command line, so they never start a stack.

Exit codes (pytest's own):

- 0: every item passed.
- 1: an item has findings of severity bug, or the stack failed. On a stack failure each item
  fails with one line, and the full error with the log tail is printed once at the end.
- 2: interrupted by SIGINT or SIGTERM, after the stack was stopped.
- 4: a usage error, such as a missing --model-dir or no Docker engine for --stack docker.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from harness.run import Session

# The harness modules are imported inside the hooks, so `pytest tests` does not depend on them
# to start, and a broken module fails only the tests that use it.
CASES_DIR = Path(__file__).resolve().parent / "cases"
STACK_CHOICES = ("cpu", "docker", "auto")

SESSION_KEY = pytest.StashKey["Session"]()
HANDLERS_KEY = pytest.StashKey[dict]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("harness", "gateway HTTP/gRPC mode diagnosis")
    group.addoption("--stack", default="cpu", choices=STACK_CHOICES, help="stack that serves the cases (default: cpu)")
    group.addoption(
        "--router",
        default="sglang-router==0.3.2",
        help="router release to test: sglang-router==X, smg==X, or 'installed' (default: sglang-router==0.3.2)",
    )
    group.addoption("--model-dir", type=Path, default=None, help="HF-format model folder (default: the Gemma 3 fixture)")
    # NOTE: write folder options as --reports-dir=DIR. pytest reads a separate existing folder
    # argument as a test path before this plugin loads, and then does not load it.
    group.addoption("--reports-dir", type=Path, default=None, help="where reports/<run-id>/ goes (default: reports/)")


def pytest_configure(config: pytest.Config) -> None:
    from harness.run import install_interrupt_handlers, install_log_redaction

    install_log_redaction()
    # SIGTERM would otherwise end pytest at once and leave the stack's process groups running.
    config.stash[HANDLERS_KEY] = install_interrupt_handlers()


def pytest_unconfigure(config: pytest.Config) -> None:
    from harness.run import restore_handlers

    previous = config.stash.get(HANDLERS_KEY, None)
    if previous is not None:
        restore_handlers(previous)


def pytest_collect_file(parent: pytest.Collector, file_path: Path):
    if file_path.suffix not in (".yaml", ".yml"):
        return None
    in_cases_dir = CASES_DIR in file_path.parents
    named_on_command_line = any(Path(arg.split("::")[0]).resolve() == file_path for arg in parent.config.args)
    if in_cases_dir or named_on_command_line:
        return CaseFile.from_parent(parent, path=file_path)
    return None


def _session(config: pytest.Config) -> "Session":
    from harness.run import DEFAULT_REPORTS_DIR, Session, SessionConfig, UsageError

    if SESSION_KEY not in config.stash:
        try:
            session = Session(
                SessionConfig(
                    stack=config.getoption("--stack"),
                    router=config.getoption("--router"),
                    model_dir=config.getoption("--model-dir"),
                    reports_dir=config.getoption("--reports-dir") or DEFAULT_REPORTS_DIR,
                )
            )
        except UsageError as error:
            raise pytest.UsageError(str(error)) from None
        config.stash[SESSION_KEY] = session
    return config.stash[SESSION_KEY]


def pytest_collection_finish(session: pytest.Session) -> None:
    # Check the flags once, before the first item runs, so a bad flag is one usage error
    # instead of a failure per item.
    if any(isinstance(item, CaseItem) for item in session.items):
        _session(session.config)


def _is_stack_failure(error: BaseException) -> bool:
    from harness.fixture import FixtureError
    from harness.stacks.base import StackError
    from harness.stacks.routers import RouterInstallError

    return isinstance(error, (StackError, FixtureError, RouterInstallError))


class CaseFileError(Exception):
    """A case file does not load; the message is FILE:LINE:COLUMN: problem."""


class CaseFile(pytest.File):
    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, CaseFileError):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)


    def collect(self):
        from harness.cases import CaseError, load_cases

        try:
            cases = load_cases(self.path)
        except CaseError as error:
            raise CaseFileError(str(error)) from None
        for case in cases:
            for mode in case.modes:
                yield CaseItem.from_parent(self, name=f"{case.id}[{mode}]", case=case, mode=mode)


class CaseFindings(Exception):
    """The mode under test has findings of severity bug; carries the case result."""

    def __init__(self, result, mode: str):
        super().__init__(f"{mode}: findings")
        self.result = result
        self.mode = mode


class CaseItem(pytest.Item):
    def __init__(self, *, case, mode: str, **kwargs):
        super().__init__(**kwargs)
        self.case = case
        self.mode = mode
        # Tags become keywords, so `pytest -k TAG` selects cases by tag as well as by id.
        self.extra_keyword_matches.update(case.tags)

    def runtest(self) -> None:
        session = _session(self.config)
        result = _case_result(session, self.case)
        findings = [f for f in result.findings if f.side in (self.mode, "both")]
        for finding in findings:
            self.user_properties.append(("finding", f"{finding.kind.value}:{finding.layer.value}:{finding.severity.value}"))
        if any(f.severity.value == "bug" for f in findings):
            raise CaseFindings(result, self.mode)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, CaseFindings):
            from harness.report import format_case_failure

            return format_case_failure(excinfo.value.result, mode=excinfo.value.mode)
        if _is_stack_failure(excinfo.value):
            first_line = str(excinfo.value).splitlines()[0]
            return f"stack failed: {first_line} (the full error is printed at the end of the session)"
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, self.case.line, f"case {self.case.id} in {self.mode} mode"


def _case_result(session: "Session", case):
    """Replay a case once for all its items and keep the result by case id."""
    if case.id not in session.results_by_case:
        session.results_by_case[case.id] = session.diagnose(case)
    return session.results_by_case[case.id]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from harness.run import last_interrupt_signal, signals_ignored

    harness_session = session.config.stash.get(SESSION_KEY, None)
    if harness_session is None:
        return
    with signals_ignored():
        paths = harness_session.close()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    start_error = harness_session.start_error
    if exitstatus == pytest.ExitCode.INTERRUPTED:
        signal_name = last_interrupt_signal() or "SIGINT"
        reporter.write_line(f"harness: interrupted by {signal_name}; stopped the stack", red=True)
    elif start_error is not None and _is_stack_failure(start_error):
        reporter.write_line(f"harness: the stack failed: {start_error}", red=True)
    if harness_session.stack_died is not None:
        reporter.write_line(f"harness: the stack stopped working during the run: {harness_session.stack_died}", red=True)
    if harness_session.results:
        from rich.console import Console

        from harness.report import render_terminal

        console = Console(file=reporter._tw._file, force_terminal=reporter.isatty)
        render_terminal(harness_session.results, console)
    if paths:
        reporter.write_line(f"harness report: {paths.get('html') or harness_session.run_dir}")
