"""The CI job summary: newest report.json -> a Markdown table of cases x modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.ci_summary import main, newest_report, render_summary

REPO_ROOT = Path(__file__).resolve().parent.parent


def _finding(kind: str, side: str, severity: str = "bug") -> dict:
    return {"kind": kind, "side": side, "severity": severity, "layer": "chat template", "explanation": "x"}


# The shape harness.report.write_report gives report.json: "stack", "summary", "cases".
REPORT = {
    "stack": {"stack": "cpu", "name": "cpu", "router": "sglang-router==0.3.2", "model_dir": "/m"},
    "summary": {"cases": 3, "failed": 1},
    "cases": [
        {
            "id": "gemma-why-sky-blue",
            "modes": {"http": {}, "grpc": {}},
            "findings": [
                _finding("missing-bos", "grpc"),
                _finding("spurious-stop", "grpc"),
                _finding("missing-bos", "grpc"),
                _finding("worker-metadata-mismatch", "grpc"),
            ],
        },
        {
            "id": "gemma-greedy",
            "modes": {"http": {}, "grpc": {}, "direct": {}},
            "findings": [_finding("near-tie", "both", severity="near-tie")],
        },
        {"id": "gemma-parity", "modes": {"grpc": {}, "http": {}}, "findings": []},
    ],
}


def _table_rows(markdown: str) -> dict[str, list[str]]:
    """Return the table's rows by first cell, each as its list of cells."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


def test_render_header_orders_modes():
    rows = _table_rows(render_summary(REPORT, "run"))
    assert rows["case"] == ["http", "grpc", "direct"]


def test_render_reported_case_cells():
    rows = _table_rows(render_summary(REPORT, "run"))
    assert rows["gemma-why-sky-blue"] == [
        "parity",
        "**missing-bos**, **spurious-stop**, **worker-metadata-mismatch**",
        "–",
    ]


def test_render_both_side_finding_in_every_mode():
    rows = _table_rows(render_summary(REPORT, "run"))
    assert rows["gemma-greedy"] == ["near-tie (near-tie)"] * 3


def test_render_parity_case():
    rows = _table_rows(render_summary(REPORT, "run"))
    assert rows["gemma-parity"] == ["parity", "parity", "–"]


def test_render_counts_and_stack_line():
    markdown = render_summary(REPORT, "Findings of run r1")
    assert markdown.startswith("### Findings of run r1\n")
    assert "Stack: stack `cpu`, router `sglang-router==0.3.2`, model_dir `/m`" in markdown
    assert markdown.rstrip().endswith("3 cases, 1 with findings of severity bug.")


def test_render_escapes_pipes():
    report = {"cases": [{"id": "a|b", "modes": {"grpc": {}}, "findings": [_finding("x|y", "grpc")]}]}
    lines = render_summary(report, "t").splitlines()
    assert "| a\\|b | **x\\|y** |" in lines


def test_render_empty_report():
    assert "The report contains no cases." in render_summary({"cases": []}, "t")


def test_render_rejects_unknown_shape():
    with pytest.raises(ValueError, match="expected a list of cases"):
        render_summary({"something": 1}, "t")


def test_newest_report_by_mtime(tmp_path):
    for index, name in enumerate(["20250102T000000Z-b", "20250101T000000Z-a"]):
        path = tmp_path / name / "report.json"
        path.parent.mkdir()
        path.write_text("{}")
        os.utime(path, (1_000_000 + index * 10, 1_000_000 + index * 10))
    (tmp_path / "20250103T000000Z-c").mkdir()  # a run that wrote no report
    assert newest_report(tmp_path) == tmp_path / "20250101T000000Z-a" / "report.json"


def test_newest_report_none(tmp_path):
    assert newest_report(tmp_path) is None
    assert newest_report(tmp_path / "missing") is None


def test_main_prints_table(tmp_path, capsys):
    run = tmp_path / "20250101T000000Z-abc123"
    run.mkdir()
    (run / "report.json").write_text(json.dumps(REPORT))
    assert main([str(tmp_path)]) == 0
    output = capsys.readouterr().out
    assert output.startswith("### Findings of run 20250101T000000Z-abc123\n")
    assert "| gemma-why-sky-blue | parity |" in output


def test_main_without_report_exits_zero(tmp_path, capsys):
    assert main([str(tmp_path)]) == 0
    assert "No report.json under" in capsys.readouterr().out


def test_main_with_broken_report_exits_zero(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "report.json").write_text("{not json")
    assert main([str(tmp_path)]) == 0
    assert "is not a readable report" in capsys.readouterr().out


def test_module_runs_as_script(tmp_path):
    result = subprocess.run([sys.executable, "-m", "harness.ci_summary", str(tmp_path)], capture_output=True,
                            text=True, cwd=REPO_ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("No report.json under")


@pytest.mark.slow
def test_summary_of_written_report(tmp_path):
    """The table of a report.json that write_report wrote from the user report's captures."""
    from harness.diff import CaseResult, compare
    from harness.report import write_report

    from gemma_captures import make_case, make_reference, reported_captures, tokenizer

    case = make_case()
    reference = make_reference(case)
    captures = reported_captures(case)
    findings = compare(case, reference, captures, tokenizer())
    result = CaseResult(case=case, reference=reference, captures=captures, findings=findings)
    write_report(tmp_path / "20250101T000000Z-abc123", [result], {"stack": "cpu", "router": "sglang-router==0.3.2"})

    markdown = render_summary(json.loads((tmp_path / "20250101T000000Z-abc123" / "report.json").read_text()), "t")
    rows = _table_rows(markdown)
    assert rows["case"] == ["http", "grpc"]
    grpc_cell = rows[case.id][1]
    expected_kinds = {f.kind.value for f in findings if f.side in ("grpc", "both")}
    assert expected_kinds, "the user report's captures must give gRPC findings"
    for kind in expected_kinds:
        assert kind in grpc_cell
    assert grpc_cell != "parity"
