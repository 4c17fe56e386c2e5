"""The reproduction end to end: real router wheels, the CPU engine on the Gemma fixture.

These tests run what `make reproduce` runs, on the cheapest case that carries the reported
prompt ("Why sky is blue?", one greedy token), and check what the harness derived from its
own observations: the ids on the wire, the usage counts and the findings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cases import load_cases
from harness.findings import Kind, Layer, Severity
from harness.run import Session, SessionConfig

pytestmark = pytest.mark.slow

CASES = {case.id: case for case in load_cases(Path(__file__).resolve().parent.parent / "cases" / "gemma.yaml")}


def diagnose(router: str, case_id: str, reports_dir: Path):
    session = Session(SessionConfig(stack="cpu", router=router, reports_dir=reports_dir))
    try:
        result = session.diagnose(CASES[case_id])
    finally:
        paths = session.close()
    return result, paths


@pytest.fixture(scope="module")
def router_032(tmp_path_factory):
    return diagnose("sglang-router==0.3.2", "gemma-max-tokens-one", tmp_path_factory.mktemp("reports"))


@pytest.fixture(scope="module")
def smg_113(tmp_path_factory):
    return diagnose("smg==1.13.0", "gemma-max-tokens-one", tmp_path_factory.mktemp("reports"))


def test_router_032_sends_prompt_without_bos(router_032):
    result, _ = router_032
    grpc = result.captures["grpc"]
    assert grpc.prompt_ids_source == "wire"
    assert result.reference.prompt_ids[0] == 2
    assert grpc.prompt_ids == result.reference.prompt_ids[1:]
    assert grpc.usage["prompt_tokens"] == 13


def test_router_032_missing_bos_finding(router_032):
    result, _ = router_032
    missing = [f for f in result.findings if f.kind == Kind.MISSING_BOS]
    assert len(missing) == 1
    finding = missing[0]
    assert finding.side == "grpc"
    assert finding.layer == Layer.CHAT_TEMPLATE
    assert finding.severity == Severity.BUG
    assert finding.stream == "prompt"
    assert finding.position == 0
    assert finding.expected == [2]


def test_router_032_http_mode_matches_reference(router_032):
    result, _ = router_032
    http = result.captures["http"]
    assert http.error is None
    assert http.usage["prompt_tokens"] == len(result.reference.prompt_ids)
    assert [f for f in result.findings if f.side == "http" and f.severity == Severity.BUG] == []


def test_router_032_direct_uses_reference_ids(router_032):
    result, _ = router_032
    direct = result.captures["direct"]
    assert direct.prompt_ids == result.reference.prompt_ids
    assert len(direct.choices[0].output_ids) == 1


def test_router_032_report_records_wire_ids(router_032):
    result, paths = router_032
    report = json.loads(Path(paths["json"]).read_text())
    (case,) = report["cases"]
    assert case["reference"]["prompt_ids"] == result.reference.prompt_ids
    assert case["modes"]["grpc"]["prompt_ids"] == result.reference.prompt_ids[1:]
    assert case["modes"]["grpc"]["prompt_ids_source"] == "wire"
    assert "missing-bos" in {finding["kind"] for finding in case["findings"]}


def test_smg_113_sends_reference_prompt(smg_113):
    result, _ = smg_113
    grpc = result.captures["grpc"]
    assert grpc.prompt_ids == result.reference.prompt_ids
    assert Kind.MISSING_BOS not in {f.kind for f in result.findings}
    assert [f for f in result.findings if f.stream == "prompt"] == []
