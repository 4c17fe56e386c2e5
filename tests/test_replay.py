"""Translating a case into sglang's native /generate body (the direct mode)."""

from __future__ import annotations

from harness.cases import Case, Message, Sampling
from harness.replay import generate_request


def make_case(**sampling) -> Case:
    return Case(id="c", model="m", messages=[Message(role="user", content="hi")], sampling=Sampling(**sampling))


def test_generate_request_renames_sampling_keys():
    body = generate_request(make_case(temperature=0.7, max_tokens=32, seed=42, n=2, top_k=5, top_p=0.9), [2, 105])
    assert body["input_ids"] == [2, 105]
    assert body["stream"] is False
    assert body["sampling_params"] == {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 5,
        "max_new_tokens": 32,
        "sampling_seed": 42,
        "n": 2,
    }


def test_generate_request_sends_only_set_keys():
    body = generate_request(make_case(), [2])
    assert body["sampling_params"] == {}
    assert "return_logprob" not in body


def test_generate_request_stops_and_logprobs():
    case = make_case(stop=["."], stop_token_ids=[107], ignore_eos=True, logprobs=True, top_logprobs=5)
    body = generate_request(case, [2])
    assert body["sampling_params"] == {"stop": ["."], "stop_token_ids": [107], "ignore_eos": True}
    assert body["return_logprob"] is True
    assert body["top_logprobs_num"] == 5
    assert body["logprob_start_len"] == -1
