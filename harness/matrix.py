"""Run cases once per router release: the matrix table and the bisect over releases.

``python -m harness matrix --router A --router B [-k EXPR]`` prints one table, cases x
releases, each cell the finding kinds or "parity", and saves it with the run's reports.
``python -m harness bisect --good A --bad B`` finds the release where the findings flip.

Each release runs on its own CPU stack. The engine and the tap are restarted with the
routers, which costs a few seconds but keeps releases from sharing any state.
A release that cannot be installed or started, or whose requests fail, shows as that,
with the first line of the error: never as parity.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.bisect import CLEAN, FINDING, SKIP, BisectError, Outcome, bisect, releases_between
from harness.cases import Case, CaseError
from harness.fixture import FixtureError
from harness.run import DEFAULT_CASES_DIR, DEFAULT_REPORTS_DIR, Session, SessionConfig, UsageError, new_run_id, select_cases
from harness.stacks.base import StackError

log = logging.getLogger(__name__)

PARITY = "parity"


@dataclass
class ReleaseRun:
    """The cases' results on one release, or why the release could not be run."""

    release: str
    # case id -> sorted finding kinds of severity bug (empty list: parity)
    cells: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None
    log_tail: str = ""
    report_dir: str | None = None
    install_s: float = 0.0
    run_s: float = 0.0

    def kinds(self) -> frozenset[str]:
        return frozenset(kind for kinds in self.cells.values() for kind in kinds)

    def outcome(self) -> Outcome:
        if self.error is not None:
            return Outcome(release=self.release, status=SKIP, detail=self.error)
        kinds = self.kinds()
        return Outcome(release=self.release, status=FINDING if kinds else CLEAN, kinds=kinds)


def run_release(release: str, cases: list[Case], model_dir: Path | None, reports_dir: Path, run_id: str) -> ReleaseRun:
    """Run the cases on a CPU stack with one router release."""
    from harness.stacks.routers import RouterInstallError, RouterRelease

    outcome = ReleaseRun(release=release)
    started = time.monotonic()
    try:
        RouterRelease.parse(release).ensure()
    except (RouterInstallError, ValueError) as error:
        outcome.error = f"install failed: {str(error).splitlines()[0]}"
        return outcome
    outcome.install_s = time.monotonic() - started

    started = time.monotonic()
    config = SessionConfig(
        stack="cpu",
        router=release,
        model_dir=model_dir,
        reports_dir=reports_dir / run_id,
        run_id=release.replace("==", "-"),
    )
    session = Session(config)
    try:
        for case in cases:
            result = session.diagnose(case)
            outcome.cells[case.id] = sorted({f.kind.value for f in result.findings if f.severity.value == "bug"})
    except StackError as error:
        first_line, _, tail = str(error).partition("\n")
        outcome.error = f"start failed: {first_line}"
        outcome.log_tail = tail
    finally:
        paths = session.close()
        outcome.report_dir = str(session.run_dir) if paths else None
        outcome.run_s = time.monotonic() - started
    return outcome


def render_matrix(runs: list[ReleaseRun], cases: list[Case], console) -> None:
    from rich.table import Table

    table = Table(title="findings per router release (bugs only)")
    table.add_column("case")
    for run in runs:
        table.add_column(run.release)
    for case in cases:
        row = [case.id]
        for run in runs:
            if run.error is not None:
                row.append(f"[red]{run.error}[/red]")
            elif run.cells.get(case.id):
                row.append("[yellow]" + ", ".join(run.cells[case.id]) + "[/yellow]")
            else:
                row.append(f"[green]{PARITY}[/green]")
        table.add_row(*row)
    console.print(table)
    for run in runs:
        console.print(f"{run.release}: install {run.install_s:.0f} s, run {run.run_s:.0f} s")


def check_release_specs(specs: list[str]) -> None:
    """Raise UsageError naming the first spec that is not a router release."""
    from harness.stacks.routers import RouterRelease

    for spec in specs:
        try:
            RouterRelease.parse(spec)
        except ValueError as error:
            raise UsageError(f"--router: {error}") from None


def install_releases(specs: list[str]) -> None:
    """Install each release into its cached venv; raise UsageError naming one that fails."""
    from harness.stacks.routers import RouterInstallError, RouterRelease

    for spec in specs:
        try:
            RouterRelease.parse(spec).ensure()
        except (RouterInstallError, ValueError) as error:
            raise UsageError(str(error).splitlines()[0]) from None


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", type=Path, help="case files or folders (default: cases/)")
    parser.add_argument("-k", dest="keyword", help="only cases whose id or tag matches (substring or glob)")
    parser.add_argument("--model-dir", type=Path, help="HF-format model folder (default: the Gemma 3 fixture)")
    parser.add_argument("--reports-dir", type=Path, default=DEFAULT_REPORTS_DIR, help="where reports go")


def main_matrix(argv: list[str]) -> int:
    """Run ``python -m harness matrix --router SPEC --router SPEC ... [-k EXPR]``."""
    from rich.console import Console

    parser = argparse.ArgumentParser(prog="python -m harness matrix")
    parser.add_argument("--router", action="append", required=True, help="a router release; repeat for each")
    _common_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cases = select_cases(args.paths or [DEFAULT_CASES_DIR], args.keyword)
        check_release_specs(args.router)
    except (UsageError, CaseError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not cases:
        print(f"error: no case matches -k {args.keyword!r}", file=sys.stderr)
        return 2

    run_id = "matrix-" + new_run_id()
    runs = []
    try:
        for release in args.router:
            log.info("matrix: running %d cases on %s", len(cases), release)
            runs.append(run_release(release, cases, args.model_dir, args.reports_dir, run_id))
    except FixtureError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    console = Console()
    render_matrix(runs, cases, console)
    out = args.reports_dir / run_id / "matrix.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([vars(run) for run in runs], indent=2))
    console.print(f"matrix: {out}")
    if any(run.error for run in runs):
        return 2
    return 1 if any(run.kinds() for run in runs) else 0


def main_bisect(argv: list[str]) -> int:
    """Run ``python -m harness bisect --good SPEC --bad SPEC [--candidates SPEC...] [-k EXPR]``."""
    from rich.console import Console

    parser = argparse.ArgumentParser(prog="python -m harness bisect")
    parser.add_argument("--good", required=True, help="a release on one side of the flip, e.g. smg==1.13.0")
    parser.add_argument("--bad", required=True, help="a release on the other side, e.g. sglang-router==0.3.2")
    parser.add_argument("--candidates", nargs="+", help="releases to consider (default: every release on the index)")
    parser.add_argument("--verify", type=int, default=2, help="extra releases tested to catch a second flip (default 2)")
    _common_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cases = select_cases(args.paths or [DEFAULT_CASES_DIR], args.keyword)
        releases = releases_between(args.good, args.bad, args.candidates)
        # Both ends must run before any case does: a typo in --good should not cost a
        # full replay on --bad first.
        install_releases([args.good, args.bad])
    except (UsageError, CaseError, BisectError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    run_id = "bisect-" + new_run_id()
    runs: dict[str, ReleaseRun] = {}
    console = Console()

    def evaluate(release: str) -> Outcome:
        console.print(f"bisect: testing {release}")
        run = run_release(release, cases, args.model_dir, args.reports_dir, run_id)
        runs[release] = run
        outcome = run.outcome()
        console.print(f"bisect: {release}: {outcome.status} {', '.join(sorted(outcome.kinds)) or outcome.detail}")
        return outcome

    try:
        result = bisect(releases, evaluate, verify=args.verify)
    except (BisectError, FixtureError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    console.print(f"bisect: {result.summary()}")
    out = args.reports_dir / run_id / "bisect.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "releases": releases,
        "summary": result.summary(),
        "tried": [vars(runs[o.release]) for o in result.tried if o.release in runs],
    }
    out.write_text(json.dumps(record, indent=2, default=sorted))
    return 0
