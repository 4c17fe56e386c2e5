"""The diff on captures built with the real Gemma 3 tokenizer: one test per kind of finding."""

from __future__ import annotations

import json

import pytest

from gemma_captures import (
    ANSWER,
    BOS,
    END_OF_TURN,
    EOS,
    REFERENCE_PROMPT_IDS,
    answer_ids,
    direct_capture,
    grpc_capture,
    http_capture,
    make_case,
    make_reference,
    reported_captures,
    streamed_grpc_capture,
    tokenizer,
    wire_params,
)
from harness.capture import TokenLogprob, WireRecord
from harness.diff import CaseResult, align_tokens, compare, find_metadata_value, order_findings, wire_output_ids
from harness.findings import Kind, Layer, Severity

# Every test here loads the tokenizer of the Gemma fixture folder, which is built on first use.
pytestmark = pytest.mark.slow


def run(case, captures):
    return compare(case, make_reference(case), captures, tokenizer())


def only(findings, kind):
    matching = [f for f in findings if f.kind == kind]
    assert len(matching) == 1, [f.headline for f in findings]
    return matching[0]


def kinds(findings):
    return [f.kind for f in findings]


# ---------------------------------------------------------------------------------------
# Parity


def test_reference_matches_known_prompt_ids():
    reference = make_reference(make_case())
    assert reference.prompt_ids == REFERENCE_PROMPT_IDS
    assert reference.generation_prompt_ids == [105, 4368, 107]


def test_parity_greedy_three_modes():
    case = make_case(temperature=0.0)
    captures = {"grpc": grpc_capture(case), "http": http_capture(case), "direct": direct_capture(case)}
    assert run(case, captures) == []


def test_parity_sampled_different_answers():
    case = make_case(temperature=0.7, max_tokens=512)
    other = "Rayleigh scattering makes the sky look blue."
    captures = {
        "grpc": grpc_capture(case, output_ids=answer_ids(other) + [END_OF_TURN]),
        "http": http_capture(case),
    }
    assert run(case, captures) == []


# ---------------------------------------------------------------------------------------
# The user report


def test_user_report_shape():
    case = make_case(temperature=0.7, max_tokens=512)
    findings = run(case, reported_captures(case))

    first = findings[0]
    assert first.kind == Kind.MISSING_BOS
    assert first.side == "grpc"
    assert first.layer == Layer.CHAT_TEMPLATE
    assert first.position == 0
    assert first.expected == [BOS]
    assert first.observed == [105]
    assert first.expected_text == "<bos>"
    assert first.observed_text == "<start_of_turn>"
    assert "does not start with <bos>" in first.explanation

    metadata = [f for f in findings if f.kind == Kind.WORKER_METADATA_MISMATCH]
    assert {(f.evidence["field"], f.expected, f.observed) for f in metadata} == {
        ("vocab_size", 262144, 128256),
        ("bos_token_id", 2, 1),
    }

    stop = only(findings, Kind.SPURIOUS_STOP)
    assert stop.side == "grpc"
    assert stop.position == 0
    assert stop.observed == END_OF_TURN
    assert stop.observed_text == "<end_of_turn>"
    assert stop.severity == Severity.INFO
    assert "87 tokens" in stop.explanation

    # The HTTP side counts 14 prompt tokens like the reference, and the gRPC usage matches
    # the 13 ids on the wire, so no count finding appears.
    assert Kind.PROMPT_COUNT_MISMATCH not in kinds(findings)
    assert Kind.OUTPUT_DIVERGENCE not in kinds(findings)
    assert all(f.side == "grpc" for f in findings)


def test_user_report_prompt_before_output():
    case = make_case(temperature=0.7, max_tokens=512)
    findings = run(case, reported_captures(case))
    positions = [n for n, f in enumerate(findings) if f.stream == "prompt"]
    outputs = [n for n, f in enumerate(findings) if f.stream == "output"]
    assert positions and outputs
    assert max(positions) < min(outputs)


def test_missing_bos_tokenizer_layer():
    case = make_case(temperature=0.7, max_tokens=512)
    reference = make_reference(case)
    captures = reported_captures(case, original_text=reference.prompt_text)
    finding = only(run(case, captures), Kind.MISSING_BOS)
    assert finding.layer == Layer.TOKENIZER
    assert "starts with <bos>" in finding.explanation


def test_missing_bos_token_window():
    case = make_case(temperature=0.7, max_tokens=512)
    finding = only(run(case, reported_captures(case)), Kind.MISSING_BOS)
    rows = finding.evidence["tokens"]["rows"]
    focus = rows[finding.evidence["tokens"]["focus"]]
    assert focus["status"] == "missing"
    assert focus["expected_id"] == BOS
    assert focus["expected_special"] is True
    assert focus["observed_id"] is None
    assert rows[focus_index(finding) + 1]["status"] == "match"


def focus_index(finding):
    return finding.evidence["tokens"]["focus"]


# ---------------------------------------------------------------------------------------
# Prompt ids


def test_extra_bos_doubled():
    case = make_case()
    captures = {"grpc": grpc_capture(case, prompt_ids=[BOS] + REFERENCE_PROMPT_IDS)}
    findings = run(case, captures)
    finding = only(findings, Kind.EXTRA_BOS)
    assert finding.layer == Layer.TOKENIZER
    assert finding.position == 1
    assert finding.observed == [BOS]
    assert Kind.TEMPLATE_DRIFT not in kinds(findings)


def test_generation_prompt_missing():
    case = make_case()
    reference = make_reference(case)
    without_generation_prompt = REFERENCE_PROMPT_IDS[:-3]
    text = reference.prompt_text[: -len("<start_of_turn>model\n")]
    findings = run(case, {"grpc": grpc_capture(case, prompt_ids=without_generation_prompt, original_text=text)})
    finding = only(findings, Kind.GENERATION_PROMPT_MISSING)
    assert finding.layer == Layer.CHAT_TEMPLATE
    assert finding.position == 11
    assert finding.expected == [105, 4368, 107]
    assert finding.expected_text == "<start_of_turn>model\n"
    assert Kind.TEMPLATE_DRIFT not in kinds(findings)
    assert Kind.MISSING_BOS not in kinds(findings)


def test_template_drift_in_text():
    case = make_case()
    reference = make_reference(case)
    text = reference.prompt_text.replace("<start_of_turn>user\n", "<start_of_turn>User\n")
    ids = tokenizer().encode(text, add_special_tokens=False)
    finding = only(run(case, {"grpc": grpc_capture(case, prompt_ids=ids, original_text=text)}), Kind.TEMPLATE_DRIFT)
    assert finding.layer == Layer.CHAT_TEMPLATE
    assert finding.position == 2
    assert finding.expected == [2364]
    assert finding.expected_text == "user"
    assert finding.observed == [ids[2]]
    assert finding.evidence["matched_prefix"] == 2
    assert finding.evidence["text_difference"]["character"] == len("<bos><start_of_turn>")


def test_template_drift_tokenizer_layer():
    case = make_case()
    reference = make_reference(case)
    # Same rendered text, but "Why" split into two ids: the tokenizer is at fault.
    split = tokenizer().encode("W", add_special_tokens=False) + tokenizer().encode("hy", add_special_tokens=False)
    ids = REFERENCE_PROMPT_IDS[:4] + split + REFERENCE_PROMPT_IDS[5:]
    finding = only(
        run(case, {"grpc": grpc_capture(case, prompt_ids=ids, original_text=reference.prompt_text)}),
        Kind.TEMPLATE_DRIFT,
    )
    assert finding.layer == Layer.TOKENIZER
    assert finding.position == 4
    assert finding.expected == [11355]


def test_template_drift_without_rendered_text():
    case = make_case()
    ids = REFERENCE_PROMPT_IDS[:4] + [9999] + REFERENCE_PROMPT_IDS[5:]
    finding = only(run(case, {"grpc": grpc_capture(case, prompt_ids=ids, original_text="")}), Kind.TEMPLATE_DRIFT)
    assert finding.layer == Layer.CHAT_TEMPLATE
    assert "no rendered text was observed" in finding.explanation
    assert "text_difference" not in finding.evidence


def test_missing_bos_and_drift_together():
    case = make_case()
    ids = REFERENCE_PROMPT_IDS[1:4] + [9999] + REFERENCE_PROMPT_IDS[5:]
    findings = run(case, {"grpc": grpc_capture(case, prompt_ids=ids, original_text="")})
    assert kinds(findings)[:2] == [Kind.MISSING_BOS, Kind.TEMPLATE_DRIFT]
    drift = findings[1]
    assert drift.position == 4
    assert drift.observed == [9999]


def test_prompt_count_http_short_by_bos():
    case = make_case()
    findings = run(case, {"http": http_capture(case, prompt_tokens=13)})
    finding = only(findings, Kind.PROMPT_COUNT_MISMATCH)
    assert finding.side == "http"
    assert finding.expected == 14
    assert finding.observed == 13
    assert finding.layer == Layer.CHAT_TEMPLATE
    assert "missing <bos>" in finding.explanation


def test_prompt_count_grpc_usage_vs_wire():
    case = make_case()
    usage = {"prompt_tokens": 20, "completion_tokens": len(answer_ids()) + 1}
    finding = only(run(case, {"grpc": grpc_capture(case, usage=usage)}), Kind.PROMPT_COUNT_MISMATCH)
    assert finding.layer == Layer.RESPONSE
    assert finding.expected == 14
    assert finding.observed == 20


# ---------------------------------------------------------------------------------------
# Stop sets


def test_stop_set_missing_from_wire():
    case = make_case()
    params = wire_params(case, stop_token_ids=[EOS], ignore_eos=True)
    finding = only(run(case, {"grpc": grpc_capture(case, params=params)}), Kind.STOP_SET_MISSING)
    assert finding.evidence["missing"] == [END_OF_TURN]
    assert finding.observed == [EOS]
    assert "<end_of_turn>" in finding.explanation


def test_wire_stop_list_without_eos_is_fine():
    # Without ignore_eos the server adds the model's EOS ids to any stop list itself.
    case = make_case()
    params = wire_params(case, stop_token_ids=[EOS, 107])
    findings = run(case, {"grpc": grpc_capture(case, params=params)})
    assert Kind.STOP_SET_MISSING not in kinds(findings)


def test_stop_string_sent_as_id_is_no_extra():
    # smg sends a stop string that is one token as a stop id.
    case = make_case(stop=["."])
    (period,) = tokenizer().encode(".", add_special_tokens=False)
    params = wire_params(case, stop_token_ids=[period])
    findings = run(case, {"grpc": grpc_capture(case, params=params)})
    assert Kind.STOP_SET_EXTRA not in kinds(findings)
    assert Kind.STOP_SET_MISSING not in kinds(findings)


def test_stop_set_extra_from_wire():
    case = make_case()
    params = wire_params(case, stop_token_ids=[EOS, END_OF_TURN, 107])
    findings = run(case, {"grpc": grpc_capture(case, params=params)})
    finding = only(findings, Kind.STOP_SET_EXTRA)
    assert finding.evidence["extra"] == [107]
    assert Kind.STOP_SET_MISSING not in kinds(findings)


def test_request_stop_ids_alone_are_no_stop_set():
    case = make_case(stop_token_ids=[4368])
    params = wire_params(case)
    assert params["stop_token_ids"] == [4368]
    findings = run(case, {"grpc": grpc_capture(case, params=params)})
    assert Kind.STOP_SET_MISSING not in kinds(findings)


def test_stop_set_missing_observed_in_output():
    case = make_case()
    ids = answer_ids() + [END_OF_TURN] + answer_ids("Also") + [END_OF_TURN]
    findings = run(case, {"grpc": grpc_capture(case, output_ids=ids)})
    finding = only(findings, Kind.STOP_SET_MISSING)
    assert finding.position == len(answer_ids())
    assert finding.expected == [END_OF_TURN]
    assert finding.stream == "output"


def test_spurious_stop_greedy():
    case = make_case()
    ids = answer_ids()
    stopped = ids[:4]
    findings = run(
        case,
        {
            "grpc": grpc_capture(case, output_ids=stopped, matched_stop=stopped[-1]),
            "direct": direct_capture(case),
        },
    )
    finding = only(findings, Kind.SPURIOUS_STOP)
    assert finding.side == "grpc"
    assert finding.baseline == "direct"
    assert finding.position == 3
    assert finding.observed == ids[3]
    assert finding.observed_text == tokenizer().decode([ids[3]])
    assert finding.severity == Severity.BUG
    assert finding.layer == Layer.STOP_SET
    # The stop-set-extra finding for the same id is folded into the spurious stop.
    assert Kind.STOP_SET_EXTRA not in kinds(findings)


def test_continuing_past_stop_blames_that_side():
    case = make_case()
    ids = answer_ids() + [END_OF_TURN] + answer_ids("Also") + [END_OF_TURN]
    findings = run(case, {"grpc": grpc_capture(case, output_ids=ids), "direct": direct_capture(case)})
    missing = only(findings, Kind.STOP_SET_MISSING)
    assert missing.side == "grpc"
    assert missing.position == len(answer_ids())
    assert Kind.SPURIOUS_STOP not in kinds(findings)


def test_spurious_stop_sampled_one_side_id():
    case = make_case(temperature=0.7, max_tokens=512)
    first = answer_ids()[0]
    params = wire_params(case, stop_token_ids=[EOS, END_OF_TURN, first])
    grpc = grpc_capture(case, output_ids=[first], matched_stop=first, params=params)
    findings = run(case, {"grpc": grpc, "http": http_capture(case)})
    finding = only(findings, Kind.SPURIOUS_STOP)
    assert finding.severity == Severity.BUG
    assert finding.position == 0
    assert "grpc only" in finding.explanation


def test_sampled_stop_later_is_not_compared():
    case = make_case(temperature=0.7, max_tokens=512)
    grpc = grpc_capture(case, output_ids=answer_ids()[:3] + [END_OF_TURN])
    assert run(case, {"grpc": grpc, "http": http_capture(case)}) == []


def test_stop_string_one_side():
    case = make_case(stop=["Rayleigh"])
    params = wire_params(case)
    http = http_capture(case, text="The sky is blue because of ", matched_stop="Rayleigh")
    grpc = grpc_capture(case, params=params)
    findings = run(case, {"grpc": grpc, "http": http})
    finding = only(findings, Kind.STOP_STRING_ONE_SIDE)
    assert finding.side == "grpc"
    assert finding.layer == Layer.DETOKENIZER
    assert finding.expected == "Rayleigh"
    assert "http honoured it" in finding.explanation


# ---------------------------------------------------------------------------------------
# Detokenizer, finish, usage


def test_detokenizer_drift():
    case = make_case()
    text = ANSWER.replace("Rayleigh", "Rayleigh ")
    finding = only(run(case, {"grpc": grpc_capture(case, text=text)}), Kind.DETOKENIZER_DRIFT)
    assert finding.layer == Layer.DETOKENIZER
    # The first differing character is the "s" of " scattering", so that token drifted.
    scattering = tokenizer().encode(" scattering", add_special_tokens=False)
    assert len(scattering) == 1
    assert finding.position == answer_ids().index(scattering[0])
    assert finding.expected == scattering
    assert finding.observed_text == text
    assert finding.expected_text == ANSWER


def test_detokenizer_special_token_in_text():
    case = make_case()
    text = ANSWER + "<end_of_turn>"
    finding = only(run(case, {"grpc": grpc_capture(case, text=text)}), Kind.DETOKENIZER_DRIFT)
    # The text shows the <end_of_turn> that decoding with skip_special_tokens drops.
    assert finding.position == len(answer_ids())
    assert finding.expected == [END_OF_TURN]


def test_stop_string_trim_is_no_drift():
    case = make_case(stop=["Rayleigh"])
    ids = answer_ids()
    cut = ids[: ids.index(tokenizer().encode(" Rayleigh", add_special_tokens=False)[0]) + 1]
    grpc = grpc_capture(case, output_ids=cut, text="The sky is blue because of ", matched_stop="Rayleigh")
    assert Kind.DETOKENIZER_DRIFT not in kinds(run(case, {"grpc": grpc}))


def test_stop_token_trim_is_no_drift():
    # A stop on "\n" (107) ends the ids with 107; sglang's text drops that token.
    case = make_case(stop_token_ids=[107])
    ids = answer_ids()[:5] + [107]
    text = tokenizer().decode(ids[:-1])
    grpc = grpc_capture(case, output_ids=ids, text=text, matched_stop=107)
    assert Kind.DETOKENIZER_DRIFT not in kinds(run(case, {"grpc": grpc}))


def test_stop_token_kept_in_text_is_no_drift():
    # With no_stop_trim the text keeps the stop token; both forms are sglang's.
    case = make_case(stop_token_ids=[107])
    ids = answer_ids()[:5] + [107]
    grpc = grpc_capture(case, output_ids=ids, text=tokenizer().decode(ids), matched_stop=107)
    assert Kind.DETOKENIZER_DRIFT not in kinds(run(case, {"grpc": grpc}))


def test_stop_token_trim_does_not_hide_other_drift():
    case = make_case(stop_token_ids=[107])
    ids = answer_ids()[:5] + [107]
    text = tokenizer().decode(ids[:-2])
    grpc = grpc_capture(case, output_ids=ids, text=text, matched_stop=107)
    assert Kind.DETOKENIZER_DRIFT in kinds(run(case, {"grpc": grpc}))


def test_finish_rewritten_by_router():
    case = make_case()
    grpc = grpc_capture(case, finish_reason="length", matched_stop=None, wire_finish=("stop", END_OF_TURN))
    findings = run(case, {"grpc": grpc})
    finding = only(findings, Kind.FINISH_MISMATCH)
    assert finding.layer == Layer.RESPONSE
    assert finding.expected == {"finish_reason": "stop", "matched_stop": END_OF_TURN}
    assert finding.observed == {"finish_reason": "length", "matched_stop": None}


def test_finish_mismatch_across_modes():
    case = make_case()
    http = http_capture(case, finish_reason="stop", matched_stop=EOS)
    findings = run(case, {"grpc": grpc_capture(case), "http": http})
    finding = only(findings, Kind.FINISH_MISMATCH)
    assert finding.layer == Layer.STOP_SET
    assert finding.baseline == "http"
    assert finding.observed["matched_stop"] == END_OF_TURN
    assert finding.expected["matched_stop"] == EOS


def test_usage_completion_mismatch():
    case = make_case()
    usage = {"prompt_tokens": 14, "completion_tokens": 3}
    finding = only(run(case, {"grpc": grpc_capture(case, usage=usage)}), Kind.USAGE_MISMATCH)
    assert finding.expected == len(answer_ids()) + 1
    assert finding.observed == 3


# ---------------------------------------------------------------------------------------
# Worker metadata, sampling params, transport


def test_worker_metadata_eos_missing():
    case = make_case()
    metadata = {"model_info": {"eos_token_ids": [EOS], "model_type": "llama", "architectures": ["LlamaForCausalLM"]}}
    findings = run(case, {"grpc": grpc_capture(case, worker_metadata=metadata)})
    by_field = {f.evidence["field"]: f for f in findings if f.kind == Kind.WORKER_METADATA_MISMATCH}
    assert set(by_field) == {"eos_token_ids", "model_type", "architectures"}
    assert by_field["eos_token_ids"].expected == [EOS, END_OF_TURN]
    assert "missing 106 '<end_of_turn>'" in by_field["eos_token_ids"].explanation


def test_worker_metadata_matching_is_quiet():
    case = make_case()
    metadata = {"vocab_size": 262144, "bos_token_id": 2, "eos_token_ids": [106, 1], "max_context_length": 32768}
    assert run(case, {"grpc": grpc_capture(case, worker_metadata=metadata)}) == []


def test_find_metadata_value_nested():
    assert find_metadata_value({"a": [{"b": {"vocab_size": 5}}]}, ["vocab_size"]) == 5
    assert find_metadata_value({"vocab_size": None}, ["vocab_size"]) is None


# Worker entries of GET /workers as sglang-router 0.3.2 and smg 1.13.0 returned them for a
# worker that reported Gemma 3's model info (trimmed to the model facts).
SGLANG_ROUTER_032_WORKER = {
    "url": "grpc://127.0.0.1:36429",
    "model_id": "google/gemma-3-270m-it",
    "connection_mode": "gRPC",
    "metadata": {
        "model_type": "gemma3_text",
        "eos_token_ids": "[1,106]",
        "bos_token_id": "2",
        "architectures": '["Gemma3ForCausalLM"]',
        "vocab_size": "262144",
        "max_context_length": "32768",
    },
}
SMG_1_13_WORKER = {
    "url": "grpc://127.0.0.1:36041",
    "models": [
        {
            "id": "google/gemma-3-270m-it",
            "model_type": ["chat", "completions", "responses", "tools"],
            "hf_model_type": "gemma3_text",
            "architectures": ["Gemma3ForCausalLM"],
            "context_length": 32768,
        }
    ],
    "labels": {
        "model_type": "gemma3_text",
        "eos_token_ids": "[1,106]",
        "vocab_size": "262144",
        "max_context_length": "32768",
        "bos_token_id": "2",
        "architectures": '["Gemma3ForCausalLM"]',
    },
}


@pytest.mark.parametrize("worker", [SGLANG_ROUTER_032_WORKER, SMG_1_13_WORKER], ids=["sglang-router-0.3.2", "smg-1.13.0"])
def test_worker_metadata_router_shapes(worker):
    case = make_case()
    assert run(case, {"grpc": grpc_capture(case, worker_metadata=worker)}) == []


@pytest.mark.parametrize("worker", [SGLANG_ROUTER_032_WORKER, SMG_1_13_WORKER], ids=["sglang-router-0.3.2", "smg-1.13.0"])
def test_worker_metadata_reported_strings(worker):
    case = make_case()
    worker = json.loads(json.dumps(worker))
    labels = worker.get("metadata") or worker["labels"]
    labels.update({"vocab_size": "128256", "bos_token_id": "1", "eos_token_ids": "[1]"})
    findings = run(case, {"grpc": grpc_capture(case, worker_metadata=worker)})
    by_field = {f.evidence["field"]: f for f in findings if f.kind == Kind.WORKER_METADATA_MISMATCH}
    assert set(by_field) == {"vocab_size", "bos_token_id", "eos_token_ids"}
    assert by_field["vocab_size"].observed == 128256
    assert by_field["bos_token_id"].observed == 1
    assert by_field["eos_token_ids"].observed == [1]
    assert by_field["eos_token_ids"].expected == [1, 106]


@pytest.mark.parametrize(
    ("override", "param", "expected", "observed"),
    [
        ({"temperature": 1.0}, "temperature", 0.7, 1.0),
        ({"top_p": 0.5}, "top_p", 0.9, 0.5),
        ({"top_k": -1}, "top_k", 20, -1),
        ({"max_new_tokens": None}, "max_tokens", 512, None),
        ({"skip_special_tokens": False}, "skip_special_tokens", True, False),
        ({"stop": []}, "stop", ["Rayleigh"], []),
        ({"stop_token_ids": []}, "stop_token_ids", [4368], []),
        ({"n": 3}, "n", 1, 3),
    ],
)
def test_sampling_param_mismatch(override, param, expected, observed):
    case = make_case(temperature=0.7, max_tokens=512, stop=["Rayleigh"], stop_token_ids=[4368])
    case.sampling.top_p = 0.9
    case.sampling.top_k = 20
    params = wire_params(case, **override)
    findings = run(case, {"grpc": grpc_capture(case, params=params)})
    mismatches = [f for f in findings if f.kind == Kind.SAMPLING_PARAM_MISMATCH]
    assert [f.evidence["param"] for f in mismatches] == [param]
    assert mismatches[0].layer == Layer.SAMPLING
    assert mismatches[0].expected == expected
    if isinstance(observed, float):
        assert mismatches[0].observed == pytest.approx(observed)
    else:
        assert mismatches[0].observed == observed


def test_float32_temperature_is_equal():
    case = make_case(temperature=0.7, max_tokens=512)
    params = wire_params(case)
    assert params["temperature"] != 0.7 or isinstance(params["temperature"], float)
    assert Kind.SAMPLING_PARAM_MISMATCH not in kinds(run(case, {"grpc": grpc_capture(case, params=params)}))


def test_request_failed():
    case = make_case()
    failed = http_capture(case)
    failed.error = "HTTP 503: tokenizer_not_ready"
    failed.status = 503
    failed.choices = []
    failed.usage = None
    findings = run(case, {"http": failed, "grpc": grpc_capture(case)})
    finding = only(findings, Kind.REQUEST_FAILED)
    assert findings[0] is finding
    assert finding.layer == Layer.TRANSPORT
    assert finding.side == "http"
    assert finding.observed == {"status": 503, "error": "HTTP 503: tokenizer_not_ready"}
    assert "503" in finding.explanation


def test_wire_call_failed():
    case = make_case()
    grpc = grpc_capture(case)
    grpc.wire[0].error = "model not loaded"
    grpc.wire[0].status_code = "UNAVAILABLE"
    finding = only(run(case, {"grpc": grpc}), Kind.REQUEST_FAILED)
    assert finding.observed == {"status": "UNAVAILABLE", "error": "model not loaded"}


# ---------------------------------------------------------------------------------------
# Output streams of deterministic cases


def logprobs_for(ids, alternatives_at):
    items = []
    for position, token_id in enumerate(ids):
        top = alternatives_at.get(position, [(token_id, -0.1)])
        items.append(TokenLogprob(logprob=top[0][1], token_id=token_id, top=top))
    return items


def test_near_tie_each_in_others_top():
    case = make_case()
    base = answer_ids() + [END_OF_TURN]
    other_word = tokenizer().encode("The sky is green", add_special_tokens=False)
    assert other_word[:3] == base[:3]
    side = other_word + [END_OF_TURN]
    a, b = base[3], side[3]
    direct = direct_capture(case, logprobs=logprobs_for(base, {3: [(a, -0.69), (b, -0.70)]}))
    grpc = grpc_capture(case, output_ids=side, logprobs=logprobs_for(side, {3: [(b, -0.69), (a, -0.70)]}))
    findings = run(case, {"grpc": grpc, "direct": direct})
    finding = only(findings, Kind.NEAR_TIE)
    assert finding.severity == Severity.NEAR_TIE
    assert finding.position == 3
    assert finding.expected == [a]
    assert finding.observed == [b]
    assert finding.evidence["matched_prefix"] == 3
    assert Kind.OUTPUT_DIVERGENCE not in kinds(findings)


def test_divergence_outside_top_k():
    case = make_case()
    base = answer_ids() + [END_OF_TURN]
    side = tokenizer().encode("The sky is green", add_special_tokens=False) + [END_OF_TURN]
    a, b = base[3], side[3]
    direct = direct_capture(case, logprobs=logprobs_for(base, {3: [(a, -0.01), (7217, -5.0)]}))
    grpc = grpc_capture(case, output_ids=side, logprobs=logprobs_for(side, {3: [(b, -0.01), (7217, -5.0)]}))
    finding = only(run(case, {"grpc": grpc, "direct": direct}), Kind.OUTPUT_DIVERGENCE)
    assert finding.severity == Severity.BUG
    assert finding.position == 3
    assert "not in each other's top logprobs" in finding.explanation
    rows = finding.evidence["tokens"]["rows"]
    assert rows[focus_index(finding)]["status"] == "changed"
    assert [r["status"] for r in rows[: focus_index(finding)]] == ["match"] * 3


def test_divergence_without_logprobs():
    case = make_case()
    side = tokenizer().encode("The sky is green", add_special_tokens=False) + [END_OF_TURN]
    finding = only(run(case, {"grpc": grpc_capture(case, output_ids=side), "direct": direct_capture(case)}), Kind.OUTPUT_DIVERGENCE)
    assert "cannot be ruled out" in finding.explanation


def test_divergence_against_http_text_is_weak():
    case = make_case()
    http = http_capture(case, text="The sky is green.")
    finding = only(run(case, {"grpc": grpc_capture(case), "http": http}), Kind.OUTPUT_DIVERGENCE)
    assert "re-encoded" in finding.explanation
    assert finding.baseline == "http"


def test_streamed_wire_ids_are_joined():
    case = make_case()
    capture = streamed_grpc_capture(case)
    assert wire_output_ids(capture) == {0: answer_ids() + [END_OF_TURN]}
    assert run(case, {"grpc": capture, "direct": direct_capture(case)}) == []


# ---------------------------------------------------------------------------------------
# Helpers and results


def test_align_tokens_positional():
    reference = make_reference(make_case())
    expected = [818, 7217, 563, 3730, 107]
    observed = [107]
    window = align_tokens(tokenizer(), reference, expected, observed, positional=True)
    statuses = [row["status"] for row in window["rows"]]
    # By position, the "\n" at expected position 4 is not matched with observed position 0.
    assert statuses[0] == "changed"
    assert "match" not in statuses


def test_align_tokens_window_is_cropped():
    reference = make_reference(make_case())
    expected = list(range(200, 240))
    observed = expected[:20] + [9] + expected[21:]
    window = align_tokens(tokenizer(), reference, expected, observed)
    assert window["truncated_before"] == 17
    assert len(window["rows"]) == 7
    assert window["rows"][window["focus"]]["expected_position"] == 20


def test_order_findings_puts_prompt_first():
    case = make_case(temperature=0.7, max_tokens=512)
    findings = run(case, reported_captures(case))
    assert order_findings(list(reversed(findings))) == findings


def test_case_result_to_dict_is_json():
    case = make_case(temperature=0.7, max_tokens=512)
    captures = reported_captures(case)
    reference = make_reference(case)
    result = CaseResult(case, reference, captures, compare(case, reference, captures, tokenizer()))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["passed"] is False
    assert data["findings"][0]["kind"] == "missing-bos"
    assert data["captures"]["grpc"]["prompt_ids"] == REFERENCE_PROMPT_IDS[1:]
    assert result.findings_for("http") == []


def test_wire_record_roundtrip_keeps_findings():
    case = make_case(temperature=0.7, max_tokens=512)
    captures = reported_captures(case)
    from harness.capture import Capture

    restored = {mode: Capture.from_dict(json.loads(c.to_json())) for mode, c in captures.items()}
    assert isinstance(restored["grpc"].wire[0], WireRecord)
    assert kinds(run(case, restored)) == kinds(run(case, captures))
