"""Turn the newest ``reports/*/report.json`` into a Markdown findings table for a CI job summary.

``python -m harness.ci_summary [REPORTS_DIR]`` prints a table of cases x modes. A cell lists
the kinds of the findings on that mode (bold for severity "bug"), or reads "parity". The nightly
workflow appends the output to ``$GITHUB_STEP_SUMMARY``. It exits 0 even when no report
exists, so that the summary step never hides the job's real outcome, and prints why.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable

MODE_ORDER = ("http", "grpc", "direct")
NOT_RUN = "–"


def newest_report(reports_dir: Path) -> Path | None:
    """Return the most recently written ``reports_dir/*/report.json``, or None when there is none."""
    candidates = [path for path in reports_dir.glob("*/report.json") if path.is_file()]
    if not candidates:
        return None
    # Run ids start with a UTC timestamp, so the folder name breaks ties between equal mtimes.
    return max(candidates, key=lambda path: (path.stat().st_mtime, path.parent.name))


def _case_entries(report: Any) -> list[dict[str, Any]]:
    """Return the per-case entries of a report: a top-level list, or the list under "cases"."""
    if isinstance(report, list):
        return [entry for entry in report if isinstance(entry, dict)]
    if isinstance(report, dict):
        for key in ("cases", "results"):
            if isinstance(report.get(key), list):
                return [entry for entry in report[key] if isinstance(entry, dict)]
    raise ValueError("expected a list of cases, or an object with a 'cases' list")


def _case_id(entry: dict[str, Any]) -> str:
    case = entry.get("case")
    if isinstance(case, dict) and case.get("id"):
        return str(case["id"])
    for key in ("case_id", "id"):
        if entry.get(key):
            return str(entry[key])
    if isinstance(case, str):
        return case
    return "?"


def _case_modes(entry: dict[str, Any]) -> list[str]:
    """Return the modes a case ran in: the captures' keys, else the case's ``modes``."""
    captures = entry.get("captures")
    if isinstance(captures, dict) and captures:
        return list(captures)
    case = entry.get("case")
    if isinstance(case, dict) and isinstance(case.get("modes"), list):
        return [str(mode) for mode in case["modes"]]
    if isinstance(entry.get("modes"), (list, dict)):
        return [str(mode) for mode in entry["modes"]]
    return []


def _ordered_modes(modes: Iterable[str]) -> list[str]:
    unique = list(dict.fromkeys(modes))
    known = [mode for mode in MODE_ORDER if mode in unique]
    return known + sorted(mode for mode in unique if mode not in MODE_ORDER)


def _cell(findings: list[dict[str, Any]], mode: str) -> str:
    """Return the cell text of one mode: its finding kinds (bugs in bold) or "parity"."""
    kinds: list[str] = []
    for finding in findings:
        if finding.get("side") not in (mode, "both"):
            continue
        kind = str(finding.get("kind", "finding"))
        text = f"**{kind}**" if finding.get("severity", "bug") == "bug" else f"{kind} ({finding.get('severity')})"
        if text not in kinds:
            kinds.append(text)
    return ", ".join(kinds) if kinds else "parity"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_summary(report: Any, title: str) -> str:
    """Render one report as Markdown: a heading, the stack line and the case x mode table."""
    entries = _case_entries(report)
    lines = [f"### {_escape(title)}", ""]
    stack = report.get("stack") if isinstance(report, dict) else None
    if isinstance(stack, dict):
        described = ", ".join(f"{key} `{stack[key]}`" for key in ("stack", "router", "model_dir") if stack.get(key))
        if described:
            lines += [f"Stack: {_escape(described)}", ""]
    if not entries:
        lines.append("The report contains no cases.")
        return "\n".join(lines) + "\n"

    modes = _ordered_modes(mode for entry in entries for mode in _case_modes(entry))
    lines.append("| case | " + " | ".join(modes) + " |")
    lines.append("| --- |" + " --- |" * len(modes))
    cases_with_bugs = 0
    for entry in entries:
        findings = [f for f in entry.get("findings") or [] if isinstance(f, dict)]
        if any(f.get("severity", "bug") == "bug" for f in findings):
            cases_with_bugs += 1
        ran = set(_case_modes(entry))
        cells = [_cell(findings, mode) if mode in ran else NOT_RUN for mode in modes]
        lines.append(f"| {_escape(_case_id(entry))} | " + " | ".join(_escape(cell) for cell in cells) + " |")
    lines += ["", f"{len(entries)} cases, {cases_with_bugs} with findings of severity bug."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.ci_summary", description=__doc__.splitlines()[0])
    parser.add_argument("reports_dir", nargs="?", type=Path, default=Path("reports"),
                        help="folder holding one subfolder per run (default: reports)")
    args = parser.parse_args(argv)

    path = newest_report(args.reports_dir)
    if path is None:
        print(f"No report.json under {args.reports_dir}/*/: the run wrote no report; see the job log.")
        return 0
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        summary = render_summary(report, title=f"Findings of run {path.parent.name}")
    except (OSError, ValueError) as error:
        print(f"{path} is not a readable report ({error}); see the job log.")
        return 0
    sys.stdout.write(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
