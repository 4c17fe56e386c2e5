"""Reports: what a person reads after a run, in the terminal, as JSON and as HTML.

Every view shows the same content: a summary of cases by modes (each cell "parity" or the
finding kinds), then each finding with a side-by-side token table around the divergence.
The token tables come from ``evidence["tokens"]`` of the findings, so the report needs no
tokenizer. Everything written to disk passes through ``redact`` first.
"""

from __future__ import annotations

import dataclasses
import html
import io
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from harness.capture import Capture
from harness.diff import MODE_ORDER, CaseResult, wire_output_ids
from harness.findings import Finding, Severity

MASK = "***"
# Keys whose values are credentials, matched case-insensitively anywhere in the key.
SECRET_KEY_PATTERN = re.compile(
    r"authorization|api[_-]?key|hf[_-]?token|hub[_-]?token|access[_-]?token|bearer|secret|password|cookie",
    re.IGNORECASE,
)
# Hugging Face user access tokens: "hf_" and 20 or more letters and digits.
HF_TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
BEARER_PATTERN = re.compile(r"(\bBearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
# A header written into a message ("Authorization: Basic dXNlcg==", "x-api-key=abc").
HEADER_PATTERN = re.compile(
    r"\b((?:proxy-)?authorization|x-api-key|api[_-]?key)([\"']?\s*[:=]\s*[\"']?)(?!Bearer\b)(?:Basic\s+)?[^\s\"',;]+",
    re.IGNORECASE,
)

SEVERITY_STYLE = {Severity.BUG: "bold red", Severity.NEAR_TIE: "yellow", Severity.INFO: "cyan"}
STATUS_MARK = {"match": "=", "changed": "!", "missing": "-", "extra": "+"}
STATUS_STYLE = {"match": "grey50", "changed": "bold red", "missing": "bold red", "extra": "bold red"}
SPECIAL_STYLE = "bold magenta"


# ---------------------------------------------------------------------------------------
# Secrets


def redact(obj: Any) -> Any:
    """Return a copy of ``obj`` with credentials masked.

    Masks the values of keys that name a credential (authorization, api_key, hf_token, ...)
    and the value after such a flag in an argument list (``--api-key X``, ``--api-key=X``).
    Inside any string it masks Hugging Face tokens (``hf_...``), bearer tokens and header
    values such as ``Authorization: Basic ...`` or ``x-api-key=...``.
    """
    if isinstance(obj, dict):
        return {key: (MASK if _is_secret_key(key) and obj[key] not in (None, "") else redact(obj[key])) for key in obj}
    if isinstance(obj, (list, tuple)):
        items = []
        mask_next = False
        for item in obj:
            if mask_next and isinstance(item, str):
                items.append(MASK)
                mask_next = False
                continue
            mask_next = False
            if isinstance(item, str) and item.startswith("-") and _is_secret_key(item.split("=", 1)[0]):
                if "=" in item:
                    items.append(item.split("=", 1)[0] + "=" + MASK)
                else:
                    items.append(item)
                    mask_next = True
                continue
            items.append(redact(item))
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, str):
        masked = HF_TOKEN_PATTERN.sub("hf_" + MASK, obj)
        masked = BEARER_PATTERN.sub(lambda match: match.group(1) + MASK, masked)
        return HEADER_PATTERN.sub(lambda match: match.group(1) + match.group(2) + MASK, masked)
    return obj


def _is_secret_key(key: Any) -> bool:
    return isinstance(key, str) and bool(SECRET_KEY_PATTERN.search(key))


def redact_finding(finding: Finding) -> Finding:
    """Return a copy of ``finding`` whose texts and evidence pass through ``redact``."""
    return dataclasses.replace(
        finding,
        explanation=redact(finding.explanation),
        expected=redact(finding.expected),
        observed=redact(finding.observed),
        expected_text=redact(finding.expected_text),
        observed_text=redact(finding.observed_text),
        evidence=redact(finding.evidence),
    )


# ---------------------------------------------------------------------------------------
# Shared pieces of every view


def modes_of(results: Iterable[CaseResult]) -> list[str]:
    """Return the modes any result captured, in the report's column order."""
    seen = {mode for result in results for mode in result.captures}
    ordered = [mode for mode in MODE_ORDER if mode in seen]
    return ordered + sorted(seen - set(ordered))


def cell_findings(result: CaseResult, mode: str) -> list[Finding] | None:
    """Return the findings of ``mode`` in one case, or None when the mode did not run."""
    if mode not in result.captures:
        return None
    return result.findings_for(mode)


def cell_label(findings: list[Finding] | None) -> list[tuple[str, Severity | None]]:
    """Return the words of a summary cell with their severity: "parity" or the finding kinds."""
    if findings is None:
        return [("not run", None)]
    if not findings:
        return [("parity", None)]
    labels: dict[str, Severity] = {}
    for finding in findings:
        current = labels.get(finding.kind.value)
        if current is None or _severity_rank(finding.severity) < _severity_rank(current):
            labels[finding.kind.value] = finding.severity
    return list(labels.items())


def _severity_rank(severity: Severity) -> int:
    return {Severity.BUG: 0, Severity.NEAR_TIE: 1, Severity.INFO: 2}[severity]


def show_piece(piece: str | None) -> str:
    """Quote a decoded token so spaces, newlines and empty pieces are visible."""
    if piece is None:
        return ""
    return json.dumps(piece, ensure_ascii=False)


def show_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return show_piece(value)
    return json.dumps(value, ensure_ascii=False, default=str)


def finding_title(finding: Finding) -> str:
    where = ""
    if finding.position is not None:
        where = f" at {finding.stream or 'output'} position {finding.position}"
    versus = f" vs {finding.baseline}" if finding.baseline != "reference" else ""
    return f"{finding.kind.value} [{finding.severity.value}] side {finding.side}{versus}, layer {finding.layer.value}{where}"


def finding_facts(finding: Finding) -> list[tuple[str, str]]:
    """Return the expected and observed values of a finding as (label, text) rows."""
    facts = []
    expected = show_value(finding.expected)
    if finding.expected_text is not None and not isinstance(finding.expected, str):
        expected += f"  {show_piece(finding.expected_text)}"
    observed = show_value(finding.observed)
    if finding.observed_text is not None and not isinstance(finding.observed, str):
        observed += f"  {show_piece(finding.observed_text)}"
    facts.append(("expected", expected))
    facts.append(("observed", observed))
    return facts


def token_window(finding: Finding) -> dict[str, Any] | None:
    window = finding.evidence.get("tokens") if finding.evidence else None
    return window if isinstance(window, dict) and window.get("rows") else None


def _position(value: int | None) -> str:
    return "" if value is None else str(value)


def _token_id(value: int | None) -> str:
    return "" if value is None else str(value)


# ---------------------------------------------------------------------------------------
# Terminal


def render_terminal(results: list[CaseResult], console: Console) -> None:
    """Print the summary table of cases by modes, then every case's findings in detail."""
    console.print(summary_table(results))
    for result in results:
        if result.findings:
            console.print()
            render_case(result, console)


def summary_table(results: list[CaseResult]) -> Table:
    modes = modes_of(results)
    table = Table(title="cases by mode", title_justify="left", show_lines=False)
    table.add_column("case", style="bold")
    for mode in modes:
        table.add_column(mode)
    table.add_column("result")
    for result in results:
        cells = []
        for mode in modes:
            cell = Text()
            for number, (label, severity) in enumerate(cell_label(cell_findings(result, mode))):
                if number:
                    cell.append("\n")
                if label == "parity":
                    style = "green"
                elif severity is None:
                    style = "grey50"
                else:
                    style = SEVERITY_STYLE[severity]
                cell.append(label, style=style)
            cells.append(cell)
        verdict = Text("pass", style="green") if result.passed else Text("FAIL", style="bold red")
        table.add_row(result.case.id, *cells, verdict)
    return table


def render_case(result: CaseResult, console: Console, mode: str | None = None) -> None:
    """Print one case's findings (only those of ``mode`` if given), each with facts and tokens."""
    findings = result.findings if mode is None else result.findings_for(mode)
    scope = "" if mode is None else f" in {mode} mode"
    console.rule(Text(f"{result.case.id}: {len(findings)} finding(s){scope}", style="bold"), align="left")
    for number, finding in enumerate(findings, start=1):
        finding = redact_finding(finding)
        title = Text(f"{number}. ")
        title.append(finding_title(finding), style=SEVERITY_STYLE[finding.severity])
        console.print(title)
        console.print(Padding(Text(finding.explanation), (0, 0, 0, 3)))
        for label, value in finding_facts(finding):
            console.print(Padding(Text(f"{label:<9}{value}"), (0, 0, 0, 3)))
        window = token_window(finding)
        if window is not None:
            console.print(Padding(token_table(finding, window), (0, 0, 0, 2)))


def token_table(finding: Finding, window: dict[str, Any]) -> Table:
    """Build the side-by-side table of aligned tokens around a finding's divergence."""
    baseline = finding.baseline
    table = Table(box=None, padding=(0, 1), show_edge=False, title_justify="left")

    # Short headers keep the table readable in an 80-column terminal: the id columns are
    # named after their side, and the stream ("prompt" or "output") is in the finding's title.
    table.add_column("", justify="center", no_wrap=True)
    table.add_column("pos", justify="right", no_wrap=True)
    table.add_column(f"{baseline} id", justify="right", no_wrap=True)
    table.add_column("token", overflow="fold", min_width=17)
    table.add_column("pos", justify="right", no_wrap=True)
    table.add_column(f"{finding.side} id", justify="right", no_wrap=True)
    table.add_column("token", overflow="fold", min_width=17)

    if window.get("truncated_before"):
        table.add_row("", "", "", f"… {window['truncated_before']} before", "", "", "", style="grey50")
    for number, row in enumerate(window["rows"]):
        status = row["status"]
        style = STATUS_STYLE[status]
        marker = ">" if number == window.get("focus") else STATUS_MARK[status]
        table.add_row(
            Text(marker, style=style),
            Text(_position(row["expected_position"]), style=style),
            Text(_token_id(row["expected_id"]), style=style),
            Text(show_piece(row["expected_piece"]), style=_piece_style(row, "expected", style)),
            Text(_position(row["observed_position"]), style=style),
            Text(_token_id(row["observed_id"]), style=style),
            Text(show_piece(row["observed_piece"]), style=_piece_style(row, "observed", style)),
        )
    if window.get("truncated_after"):
        table.add_row("", "", "", f"… {window['truncated_after']} after", "", "", "", style="grey50")

    return table


def _piece_style(row: dict[str, Any], side: str, style: str) -> str:
    if row.get(f"{side}_special"):
        return SPECIAL_STYLE if row["status"] != "match" else "magenta"
    return style


def format_case_failure(result: CaseResult, mode: str | None = None, width: int = 120) -> str:
    """Return one case's summary row and findings as plain text, for pytest's repr_failure.

    The content is the terminal view without colours. With ``mode``, only the findings on
    that mode (and on both sides) are detailed, but the summary row shows every mode.
    Token rows carry a mark: ``=`` matched, ``!`` changed, ``-`` missing on the observed
    side, ``+`` extra, and ``>`` the first divergence.
    """
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False, highlight=False)
    console.print(summary_table([result]))
    if (result.findings if mode is None else result.findings_for(mode)):
        render_case(result, console, mode)
    return "\n".join(line.rstrip() for line in buffer.getvalue().rstrip().splitlines()) + "\n"


# ---------------------------------------------------------------------------------------
# Files


def case_to_dict(result: CaseResult) -> dict[str, Any]:
    """Return the report.json entry of one case: reference, each mode's observations, findings."""
    reference = result.reference
    modes = {}
    for mode, capture in result.captures.items():
        modes[mode] = mode_to_dict(capture)
    return {
        "id": result.case.id,
        "description": result.case.description,
        "deterministic": result.case.deterministic,
        "passed": result.passed,
        "request": result.case.chat_request(),
        "reference": {
            "prompt_ids": reference.prompt_ids,
            "prompt_text": reference.prompt_text,
            "stop_ids": reference.stop_ids,
            "stop_id_sources": {str(k): v for k, v in reference.stop_id_sources.items()},
            "stop_strings": reference.stop_strings,
            "request_stop_ids": reference.request_stop_ids,
            "bos_id": reference.bos_id,
            "eos_ids": reference.eos_ids,
            "vocab_size": reference.vocab_size,
            "model_type": reference.model_type,
            "architectures": reference.architectures,
            "max_context_length": reference.max_context_length,
        },
        "modes": modes,
        "findings": [finding.to_dict() for finding in result.findings],
    }


def mode_to_dict(capture: Capture) -> dict[str, Any]:
    wire_ids = wire_output_ids(capture)
    choices = []
    for choice in capture.choices:
        ids, source = choice.output_ids, choice.output_ids_source
        if choice.index in wire_ids and (ids is None or source == "wire"):
            ids, source = wire_ids[choice.index], "wire"
        choices.append(
            {
                "index": choice.index,
                "output_ids": ids,
                "output_ids_source": source,
                "text": choice.text,
                "finish_reason": choice.finish_reason,
                "matched_stop": choice.matched_stop,
            }
        )
    return {
        "status": capture.status,
        "error": capture.error,
        "prompt_ids": capture.prompt_ids,
        "prompt_ids_source": capture.prompt_ids_source,
        "prompt_text": capture.wire[0].request.original_text if capture.wire else None,
        "choices": choices,
        "usage": capture.usage,
        "wire_calls": len(capture.wire),
        "worker_metadata": capture.worker_metadata,
        "elapsed_s": capture.elapsed_s,
    }


def safe_file_name(name: str) -> str:
    """Return ``name`` with every character outside letters, digits, ``.``, ``_`` and ``-`` as ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


def write_report(run_dir: Path, results: list[CaseResult], stack_info: dict) -> dict[str, Path]:
    """Write report.json, report.html and captures/<case>.<mode>.json under ``run_dir``.

    Returns the written paths by name: "json", "html" and "captures" (the folder).
    Credentials are masked with ``redact`` before anything is written.
    """
    run_dir = Path(run_dir)
    captures_dir = run_dir / "captures"
    captures_dir.mkdir(parents=True, exist_ok=True)

    for result in results:
        for mode, capture in result.captures.items():
            path = captures_dir / f"{safe_file_name(result.case.id)}.{safe_file_name(mode)}.json"
            path.write_text(json.dumps(redact(capture.to_dict()), indent=2, sort_keys=True, default=str) + "\n")

    document = redact(
        {
            "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "stack": stack_info,
            "summary": {
                "cases": len(results),
                "failed": sum(1 for result in results if not result.passed),
                "modes": modes_of(results),
                "cells": {
                    result.case.id: {
                        mode: [label for label, _ in cell_label(cell_findings(result, mode))]
                        for mode in modes_of(results)
                    }
                    for result in results
                },
            },
            "cases": [case_to_dict(result) for result in results],
        }
    )
    json_path = run_dir / "report.json"
    json_path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    html_path = run_dir / "report.html"
    html_path.write_text(render_html(document, results))
    return {"json": json_path, "html": html_path, "captures": captures_dir}


# ---------------------------------------------------------------------------------------
# HTML

HTML_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #1d1d1f; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 32px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 18px 0 4px; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f6; font-weight: 600; }
code, .mono, td.tok, td.num { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 13px; }
td.num { text-align: right; }
.meta { color: #555; margin: 0 0 16px; }
.parity { color: #137333; font-weight: 600; }
.bug { color: #b3261e; font-weight: 600; }
.near-tie { color: #8a6100; font-weight: 600; }
.info { color: #0b57d0; }
.notrun { color: #888; }
.pass { color: #137333; font-weight: 600; }
.fail { color: #b3261e; font-weight: 600; }
.finding { border-left: 4px solid #ccc; padding: 2px 0 2px 12px; margin: 12px 0; }
.finding.severity-bug { border-color: #b3261e; }
.finding.severity-near-tie { border-color: #e0a800; }
.finding.severity-info { border-color: #0b57d0; }
.finding p { margin: 4px 0; color: #1d1d1f; font-weight: 400; }
.facts td:first-child { color: #555; }
tr.match td { color: #999; }
tr.changed td, tr.missing td, tr.extra td { background: #fdecea; }
tr.focus td { border-top: 2px solid #b3261e; }
.special { color: #8e24aa; font-weight: 600; }
tr.match .special { color: #c58fd0; }
.ids { max-width: 1200px; word-break: break-all; }
summary { cursor: pointer; }
pre.text { max-height: 16em; overflow-y: auto; min-width: 16em; }
pre { background: #f7f7f9; padding: 8px; white-space: pre-wrap; word-break: break-word; max-width: 1200px; margin: 4px 0; }
"""


def render_html(document: dict[str, Any], results: list[CaseResult]) -> str:
    """Render the report as one self-contained HTML page: inline CSS, no scripts, no external links."""
    modes = document["summary"]["modes"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>gateway diff report</title>",
        f"<style>{HTML_STYLE}</style></head><body>",
        "<h1>HTTP vs gRPC diff report</h1>",
        f'<p class="meta">{_e(document["summary"]["cases"])} case(s), {_e(document["summary"]["failed"])} failed; '
        f"generated {_e(document['generated_at'])}</p>",
        _html_stack(document.get("stack") or {}),
        "<h2>Summary</h2>",
        _html_summary(results, modes),
    ]
    for case, result in zip(document["cases"], results):
        parts.append(_html_case(case, result))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _html_stack(stack: dict[str, Any]) -> str:
    if not stack:
        return ""
    rows = []
    for key, value in stack.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        rows.append(f"<tr><th>{_e(key)}</th><td class=\"mono\">{_e(text)}</td></tr>")
    return '<table class="stack">' + "".join(rows) + "</table>"


def _html_summary(results: list[CaseResult], modes: list[str]) -> str:
    head = "<tr><th>case</th>" + "".join(f"<th>{_e(mode)}</th>" for mode in modes) + "<th>result</th></tr>"
    rows = []
    for result in results:
        cells = []
        for mode in modes:
            labels = []
            for label, severity in cell_label(cell_findings(result, mode)):
                if label == "parity":
                    css = "parity"
                elif severity is None:
                    css = "notrun"
                else:
                    css = severity.value
                labels.append(f'<span class="{css}">{_e(label)}</span>')
            cells.append("<td>" + "<br>".join(labels) + "</td>")
        verdict = '<span class="pass">pass</span>' if result.passed else '<span class="fail">FAIL</span>'
        anchor = f'<a href="#case-{_e(safe_file_name(result.case.id))}">{_e(result.case.id)}</a>'
        rows.append(f"<tr><td>{anchor}</td>{''.join(cells)}<td>{verdict}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _html_case(case: dict[str, Any], result: CaseResult) -> str:
    reference = case["reference"]
    parts = [
        f'<h2 id="case-{_e(safe_file_name(case["id"]))}">{_e(case["id"])}</h2>',
        f'<p class="meta">{_e(case["description"])} ({"deterministic" if case["deterministic"] else "sampled without a seed"})</p>',
        "<h3>Reference</h3>",
        '<table class="facts">',
        f'<tr><td>prompt ids ({len(reference["prompt_ids"])})</td><td class="mono ids">{_e(reference["prompt_ids"])}</td></tr>',
        f'<tr><td>prompt text</td><td><pre>{_e(reference["prompt_text"])}</pre></td></tr>',
        f'<tr><td>stop ids</td><td class="mono">{_e(_stop_sources(reference))}</td></tr>',
        f'<tr><td>stop strings</td><td class="mono">{_e(reference["stop_strings"])}</td></tr>',
        "</table>",
        "<h3>Modes</h3>",
        _html_modes(case["modes"]),
    ]
    if case["findings"]:
        parts.append(f"<h3>Findings ({len(case['findings'])})</h3>")
        for number, finding in enumerate(result.findings, start=1):
            parts.append(_html_finding(number, redact_finding(finding)))
    else:
        parts.append('<p class="parity">parity: no findings</p>')
    return "\n".join(parts)


def _stop_sources(reference: dict[str, Any]) -> str:
    sources = reference["stop_id_sources"]
    return "; ".join(f"{i} ({', '.join(sources.get(str(i), []))})" for i in reference["stop_ids"]) or "none"


def _usage_text(usage: dict[str, Any] | None) -> str:
    if not usage:
        return "-"
    return ", ".join(f"{key.replace('_tokens', '')} {value}" for key, value in usage.items())


# Id lists longer than this are folded into a <details> element.
FOLD_IDS = 40


def _html_ids(ids: list[int], source: str | None) -> str:
    meta = f'<span class="meta">({len(ids)}, {_e(source)})</span>'
    if len(ids) <= FOLD_IDS:
        return f"{_e(ids)} {meta}"
    head = ", ".join(str(i) for i in ids[:FOLD_IDS])
    return f"<details><summary>[{_e(head)}, …] {meta}</summary>{_e(ids)}</details>"


def _html_modes(modes: dict[str, dict[str, Any]]) -> str:
    head = (
        "<tr><th>mode</th><th>status</th><th>prompt ids (source)</th><th>output ids (source)</th>"
        "<th>text</th><th>finish / matched</th><th>usage</th></tr>"
    )
    rows = []
    for mode in [m for m in MODE_ORDER if m in modes] + sorted(set(modes) - set(MODE_ORDER)):
        data = modes[mode]
        status = _e(data["status"]) + (f'<br><span class="bug">{_e(data["error"])}</span>' if data["error"] else "")
        if data["prompt_ids"] is not None:
            prompt = _html_ids(data["prompt_ids"], data["prompt_ids_source"])
        else:
            prompt = '<span class="notrun">not observed</span>'

        if data.get("prompt_text") is not None:
            prompt += f"<pre>{_e(data['prompt_text'])}</pre>"
        choices = data["choices"] or [{}]
        for number, choice in enumerate(choices):
            ids = choice.get("output_ids")
            if ids is not None:
                output = _html_ids(ids, choice.get("output_ids_source"))
            else:
                output = '<span class="notrun">none</span>'

            finish = f'{_e(choice.get("finish_reason"))} / {_e(choice.get("matched_stop"))}' if choice else ""
            first = number == 0
            rows.append(
                "<tr>"
                + (f'<td rowspan="{len(choices)}">{_e(mode)}</td><td rowspan="{len(choices)}">{status}</td>'
                   f'<td rowspan="{len(choices)}" class="mono ids">{prompt}</td>' if first else "")
                + f'<td class="mono ids">{output}</td>'
                + _html_text_cell(choice.get("text"))
                + f'<td class="mono">{finish}</td>'
                + (f'<td rowspan="{len(choices)}" class="mono">{_e(_usage_text(data["usage"]))}</td>' if first else "")
                + "</tr>"
            )
    return f"<table>{head}{''.join(rows)}</table>"


def _html_text_cell(text: str | None) -> str:
    if text is None:
        return '<td><span class="notrun">none</span></td>'
    if text == "":
        return '<td><span class="notrun">empty</span></td>'
    return f'<td><pre class="text">{_e(text)}</pre><span class="meta">{len(text)} characters</span></td>'


def _html_finding(number: int, finding: Finding) -> str:
    severity = finding.severity.value
    facts = "".join(
        f'<tr><td>{_e(label)}</td><td class="mono">{_e(value)}</td></tr>' for label, value in finding_facts(finding)
    )
    parts = [
        f'<div class="finding severity-{severity}">',
        f'<div class="{severity}">{number}. {_e(finding_title(finding))}</div>',
        f"<p>{_e(finding.explanation)}</p>",
        f'<table class="facts">{facts}</table>',
    ]
    window = token_window(finding)
    if window is not None:
        parts.append(_html_tokens(finding, window))
    parts.append("</div>")
    return "\n".join(parts)


def _html_tokens(finding: Finding, window: dict[str, Any]) -> str:
    baseline = finding.baseline
    stream = finding.stream or "output"
    head = (
        f"<tr><th></th><th>{_e(stream)} pos</th><th>{_e(baseline)} id</th><th>{_e(baseline)} token</th>"
        f"<th>{_e(finding.side)} pos</th><th>{_e(finding.side)} id</th><th>{_e(finding.side)} token</th></tr>"
    )
    rows = []
    if window.get("truncated_before"):
        rows.append(f'<tr class="match"><td colspan="7">… {_e(window["truncated_before"])} tokens before</td></tr>')
    for number, row in enumerate(window["rows"]):
        css = row["status"] + (" focus" if number == window.get("focus") else "")
        marker = ">" if number == window.get("focus") else STATUS_MARK[row["status"]]
        rows.append(
            f'<tr class="{css}"><td class="mono">{_e(marker)}</td>'
            f'<td class="num">{_e(_position(row["expected_position"]))}</td>'
            f'<td class="num">{_e(_token_id(row["expected_id"]))}</td>'
            f"{_html_piece(row, 'expected')}"
            f'<td class="num">{_e(_position(row["observed_position"]))}</td>'
            f'<td class="num">{_e(_token_id(row["observed_id"]))}</td>'
            f"{_html_piece(row, 'observed')}</tr>"
        )
    if window.get("truncated_after"):
        rows.append(f'<tr class="match"><td colspan="7">… {_e(window["truncated_after"])} tokens after</td></tr>')
    return f"<table class=\"tokens\">{head}{''.join(rows)}</table>"


def _html_piece(row: dict[str, Any], side: str) -> str:
    text = _e(show_piece(row[f"{side}_piece"]))
    if row.get(f"{side}_special"):
        text = f'<span class="special">{text}</span>'
    return f'<td class="tok">{text}</td>'
