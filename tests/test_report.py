"""Reports: secrets masked, files complete and self-contained, terminal and plain text views."""

from __future__ import annotations

import json
import re

import pytest
from rich.console import Console

from harness.capture import Capture
from harness.report import (
    MASK,
    format_case_failure,
    redact,
    render_terminal,
    safe_file_name,
    write_report,
)

HF_TOKEN = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
API_KEY = "sk-test-0123456789"


# ---------------------------------------------------------------------------------------
# redact


def test_redact_masks_secret_keys():
    data = {
        "headers": {"Authorization": "Bearer abc", "Content-Type": "application/json"},
        "env": {"HF_TOKEN": HF_TOKEN, "HUGGING_FACE_HUB_TOKEN": "x", "PATH": "/usr/bin"},
        "api_key": API_KEY,
        "openai-api-key": API_KEY,
    }
    masked = redact(data)
    assert masked["headers"]["Authorization"] == MASK
    assert masked["headers"]["Content-Type"] == "application/json"
    assert masked["env"]["HF_TOKEN"] == MASK
    assert masked["env"]["HUGGING_FACE_HUB_TOKEN"] == MASK
    assert masked["env"]["PATH"] == "/usr/bin"
    assert masked["api_key"] == MASK
    assert masked["openai-api-key"] == MASK


def test_redact_keeps_token_counts_and_ids():
    data = {"usage": {"prompt_tokens": 13}, "bos_token_id": 2, "eos_token_ids": [1, 106], "max_new_tokens": 512}
    assert redact(data) == data


def test_redact_masks_tokens_in_strings():
    text = f"download failed for {HF_TOKEN}; header Authorization: Bearer {API_KEY} rejected"
    masked = redact(text)
    assert HF_TOKEN not in masked
    assert API_KEY not in masked
    assert masked == f"download failed for hf_{MASK}; header Authorization: Bearer {MASK} rejected"


@pytest.mark.parametrize(
    "text",
    [
        f"Authorization: Basic {API_KEY}",
        f"authorization={API_KEY}",
        f'{{"x-api-key": "{API_KEY}"}}',
        f"api_key: {API_KEY}",
    ],
)
def test_redact_masks_header_values(text):
    masked = redact(text)
    assert API_KEY not in masked
    assert MASK in masked


def test_redact_masks_flag_values():
    argv = ["--model-path", "/m", "--api-key", API_KEY, f"--hf-token={HF_TOKEN}", "--port", "30000"]
    assert redact(argv) == ["--model-path", "/m", "--api-key", MASK, f"--hf-token={MASK}", "--port", "30000"]


def test_redact_leaves_input_unchanged():
    data = {"api_key": API_KEY, "nested": [HF_TOKEN]}
    redact(data)
    assert data == {"api_key": API_KEY, "nested": [HF_TOKEN]}


def test_safe_file_name():
    assert safe_file_name("gemma/reported case") == "gemma_reported_case"
    assert safe_file_name("a.b-c_d") == "a.b-c_d"
    assert safe_file_name("") == "_"


# ---------------------------------------------------------------------------------------
# Views of real diff results (these need the Gemma fixture's tokenizer)


@pytest.fixture(scope="module")
def results():
    from gemma_captures import (
        direct_capture,
        grpc_capture,
        http_capture,
        make_case,
        make_reference,
        reported_captures,
        tokenizer,
    )
    from harness.diff import CaseResult, compare

    case_results = []
    reported = make_case("gemma-reported", temperature=0.7, max_tokens=512)
    reported.description = "The reported request <script>alert(1)</script>"
    captures = reported_captures(reported)
    captures["grpc"].request["api_key"] = API_KEY
    captures["http"].raw = {"note": f"token {HF_TOKEN}"}
    reference = make_reference(reported)
    case_results.append(CaseResult(reported, reference, captures, compare(reported, reference, captures, tokenizer())))

    parity = make_case("gemma/greedy parity")
    captures = {"grpc": grpc_capture(parity), "http": http_capture(parity), "direct": direct_capture(parity)}
    reference = make_reference(parity)
    case_results.append(CaseResult(parity, reference, captures, compare(parity, reference, captures, tokenizer())))
    return case_results


@pytest.mark.slow
def test_write_report_files(tmp_path, results):
    paths = write_report(tmp_path, results, {"name": "cpu", "env": {"HF_TOKEN": HF_TOKEN}})
    assert paths["json"] == tmp_path / "report.json"
    assert paths["html"] == tmp_path / "report.html"
    names = sorted(p.name for p in (tmp_path / "captures").iterdir())
    assert names == [
        "gemma-reported.grpc.json",
        "gemma-reported.http.json",
        "gemma_greedy_parity.direct.json",
        "gemma_greedy_parity.grpc.json",
        "gemma_greedy_parity.http.json",
    ]


@pytest.mark.slow
def test_report_json_content(tmp_path, results):
    from gemma_captures import REFERENCE_PROMPT_IDS

    document = json.loads(write_report(tmp_path, results, {"name": "cpu"})["json"].read_text())
    assert document["summary"]["cases"] == 2
    assert document["summary"]["failed"] == 1
    assert document["summary"]["cells"]["gemma-reported"]["http"] == ["parity"]
    assert document["summary"]["cells"]["gemma-reported"]["direct"] == ["not run"]
    assert document["summary"]["cells"]["gemma/greedy parity"]["grpc"] == ["parity"]

    case = document["cases"][0]
    assert case["reference"]["prompt_ids"] == REFERENCE_PROMPT_IDS
    assert case["reference"]["prompt_text"].startswith("<bos><start_of_turn>user\n")
    assert case["reference"]["stop_ids"] == [1, 106]
    grpc = case["modes"]["grpc"]
    assert grpc["prompt_ids"] == REFERENCE_PROMPT_IDS[1:]
    assert grpc["prompt_ids_source"] == "wire"
    assert grpc["choices"][0]["output_ids"] == [106]
    assert grpc["choices"][0]["output_ids_source"] == "wire"
    assert grpc["choices"][0]["text"] == ""
    assert grpc["choices"][0]["finish_reason"] == "stop"
    assert grpc["choices"][0]["matched_stop"] == 106
    assert grpc["usage"]["prompt_tokens"] == 13
    http = case["modes"]["http"]
    assert http["prompt_ids"] is None
    assert http["choices"][0]["output_ids_source"] == "retokenized"
    assert case["findings"][0]["kind"] == "missing-bos"
    assert case["findings"][0]["layer"] == "chat template"


@pytest.mark.slow
def test_capture_files_load_back(tmp_path, results):
    write_report(tmp_path, results, {})
    data = json.loads((tmp_path / "captures" / "gemma-reported.grpc.json").read_text())
    capture = Capture.from_dict(data)
    assert capture.wire[0].request.prompt_ids == results[0].captures["grpc"].wire[0].request.prompt_ids
    assert capture.request["api_key"] == MASK


@pytest.mark.slow
def test_written_files_hold_no_secret(tmp_path, results):
    write_report(tmp_path, results, {"env": {"HF_TOKEN": HF_TOKEN}, "argv": ["--api-key", API_KEY]})
    for path in tmp_path.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert HF_TOKEN not in text, path
            assert API_KEY not in text, path


@pytest.mark.slow
def test_html_is_self_contained_and_escaped(tmp_path, results):
    page = write_report(tmp_path, results, {"name": "cpu"})["html"].read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "<link" not in page
    assert "&lt;bos&gt;" in page
    assert 'class="special"' in page
    assert 'class="parity">parity<' in page
    assert "missing-bos" in page


@pytest.mark.slow
def test_terminal_summary_and_tables(results):
    console = Console(record=True, width=140, force_terminal=True)
    render_terminal(results, console)
    text = console.export_text()
    assert "cases by mode" in text
    assert "gemma-reported" in text
    assert "parity" in text
    assert "missing-bos" in text
    assert "FAIL" in text
    assert "pass" in text
    assert '"<bos>"' in text
    assert "reference id" in text
    assert "grpc id" in text


@pytest.mark.slow
def test_terminal_colours_by_severity(results):
    console = Console(record=True, width=140, force_terminal=True, color_system="truecolor")
    render_terminal(results, console)
    styled = console.export_html(inline_styles=True)
    # The bug kind is red, and the info kind (the stop at position 0) is not.
    assert re.search(r'<span style="[^"]*color: #800000[^"]*">missing-bos', styled)
    assert not re.search(r'<span style="[^"]*color: #800000[^"]*">spurious-stop', styled)


@pytest.mark.slow
def test_format_case_failure_plain(results):
    text = format_case_failure(results[0])
    assert "\x1b[" not in text
    assert text.splitlines()[0].strip() == "cases by mode"
    assert "gemma-reported: 4 finding(s)" in text
    assert "1. missing-bos [bug] side grpc, layer chat template at prompt position 0" in text
    rows = [line.split() for line in text.splitlines() if line.strip().startswith(">")]
    assert rows[0][:4] == [">", "0", "2", '"<bos>"']
    assert "spurious-stop [info]" in text


@pytest.mark.slow
def test_format_case_failure_parity(results):
    text = format_case_failure(results[1])
    assert "parity" in text
    assert "finding(s)" not in text


@pytest.mark.slow
def test_format_case_failure_one_mode(results):
    grpc = format_case_failure(results[0], mode="grpc")
    assert "gemma-reported: 4 finding(s) in grpc mode" in grpc
    http = format_case_failure(results[0], mode="http")
    assert "missing-bos" in http  # the summary row still shows every mode
    assert "finding(s)" not in http


@pytest.mark.slow
def test_report_joins_streamed_ids(tmp_path):
    from gemma_captures import END_OF_TURN, answer_ids, make_case, make_reference, streamed_grpc_capture
    from harness.diff import CaseResult

    case = make_case("streamed")
    captures = {"grpc": streamed_grpc_capture(case)}
    write_report(tmp_path, [CaseResult(case, make_reference(case), captures, [])], {})
    document = json.loads((tmp_path / "report.json").read_text())
    choice = document["cases"][0]["modes"]["grpc"]["choices"][0]
    assert choice["output_ids"] == answer_ids() + [END_OF_TURN]
    assert choice["output_ids_source"] == "wire"
