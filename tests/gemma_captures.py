"""Builders of Gemma 3 cases, references and captures for the diff and report tests.

Every id and text comes from the real Gemma 3 tokenizer of the fixture folder, so a finding
the tests expect is one the diff would produce on real traffic. Wire sampling params are
built as protobuf messages and converted the way the tap converts them.
"""

from __future__ import annotations

import functools
from typing import Any

from google.protobuf import json_format
from smg_grpc_proto.generated import sglang_scheduler_pb2

from harness.capture import Capture, ChoiceCapture, TokenLogprob, WireCompletion, WireRecord, WireRequest
from harness.cases import Case, Message, Sampling
from harness.reference import Reference

QUESTION = "Why sky is blue?"
ANSWER = "The sky is blue because of Rayleigh scattering."
BOS, EOS, START_OF_TURN, END_OF_TURN, NEWLINE = 2, 1, 105, 106, 107
REFERENCE_PROMPT_IDS = [2, 105, 2364, 107, 11355, 7217, 563, 3730, 236881, 106, 107, 105, 4368, 107]


@functools.lru_cache(maxsize=1)
def fixture_dir() -> str:
    from harness.fixture import build_fixture

    return str(build_fixture())


@functools.lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(fixture_dir())


def make_case(
    case_id: str = "gemma-case",
    temperature: float | None = 0.0,
    seed: int | None = None,
    max_tokens: int | None = 48,
    stop: list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    content: str = QUESTION,
) -> Case:
    return Case(
        id=case_id,
        model="google/gemma-3-270m-it",
        messages=[Message(role="user", content=content)],
        sampling=Sampling(
            temperature=temperature,
            seed=seed,
            max_tokens=max_tokens,
            stop=list(stop or []),
            stop_token_ids=list(stop_token_ids or []),
        ),
    )


def make_reference(case: Case) -> Reference:
    """Render the case with the fixture's chat template, as transformers does."""
    tok = tokenizer()
    conversation = [{"role": m.role, "content": m.content} for m in case.messages]
    prompt_text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok.encode(prompt_text, add_special_tokens=False)
    without = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
    base_ids = tok.encode(without, add_special_tokens=False)
    special = {i: t.content for i, t in tok.added_tokens_decoder.items() if t.special}
    return Reference(
        case_id=case.id,
        model_dir=fixture_dir(),
        prompt_text=prompt_text,
        prompt_ids=prompt_ids,
        stop_ids=[EOS, END_OF_TURN],
        stop_id_sources={EOS: ["generation_config.json", "config.json"], END_OF_TURN: ["generation_config.json"]},
        bos_id=BOS,
        eos_ids=[EOS, END_OF_TURN],
        pad_id=0,
        vocab_size=262144,
        model_type="gemma3_text",
        architectures=["Gemma3ForCausalLM"],
        max_context_length=32768,
        generation_prompt_ids=prompt_ids[len(base_ids) :],
        special_tokens=special,
        stop_strings=list(case.sampling.stop),
        request_stop_ids=list(case.sampling.stop_token_ids),
    )


def wire_params(case: Case, **overrides: Any) -> dict[str, Any]:
    """Return the sampling params a correct router sends for ``case``, as the tap records them."""
    sampling = case.sampling
    values: dict[str, Any] = {
        "temperature": sampling.temperature if sampling.temperature is not None else 1.0,
        "top_p": sampling.top_p if sampling.top_p is not None else 1.0,
        "top_k": sampling.top_k if sampling.top_k is not None else -1,
        "stop": list(sampling.stop),
        "stop_token_ids": list(sampling.stop_token_ids),
        "skip_special_tokens": True,
    }
    if sampling.max_tokens is not None:
        values["max_new_tokens"] = sampling.max_tokens
    values.update(overrides)
    if values.get("max_new_tokens") is None:
        values.pop("max_new_tokens", None)
    message = sglang_scheduler_pb2.SamplingParams(**values)
    params = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    for descriptor in message.DESCRIPTOR.fields:
        params.setdefault(descriptor.name, None)
    return params


def answer_ids(text: str = ANSWER) -> list[int]:
    return tokenizer().encode(text, add_special_tokens=False)


def grpc_capture(
    case: Case,
    prompt_ids: list[int] | None = None,
    output_ids: list[int] | None = None,
    text: str | None = None,
    finish_reason: str = "stop",
    matched_stop: int | str | None = END_OF_TURN,
    usage: dict[str, int] | None = None,
    original_text: str | None = None,
    params: dict[str, Any] | None = None,
    wire_finish: tuple[str, int | str | None] | None = None,
    logprobs: list[TokenLogprob] | None = None,
    worker_metadata: dict[str, Any] | None = None,
) -> Capture:
    """Build what the replay records in gRPC mode: the router's response and the tap's record."""
    reference = make_reference(case)
    prompt_ids = list(reference.prompt_ids if prompt_ids is None else prompt_ids)
    output_ids = list(answer_ids() + [END_OF_TURN] if output_ids is None else output_ids)
    if text is None:
        text = tokenizer().decode(output_ids, skip_special_tokens=True)
    if usage is None:
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(output_ids)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    wire_reason, wire_matched = wire_finish or (finish_reason, matched_stop)
    record = WireRecord(
        request=WireRequest(
            request_id="chatcmpl-test",
            prompt_ids=prompt_ids,
            original_text=reference.prompt_text if original_text is None else original_text,
            sampling_params=params if params is not None else wire_params(case),
            stream=False,
        ),
        completions=[
            WireCompletion(
                index=0,
                output_ids=output_ids,
                finish_reason=wire_reason,
                matched_stop=wire_matched,
                prompt_tokens=len(prompt_ids),
                completion_tokens=len(output_ids),
                logprobs=logprobs,
            )
        ],
    )
    return Capture(
        case_id=case.id,
        mode="grpc",
        request=case.chat_request(),
        status=200,
        choices=[
            ChoiceCapture(
                index=0,
                text=text,
                output_ids=output_ids,
                output_ids_source="wire",
                finish_reason=finish_reason,
                matched_stop=matched_stop,
                logprobs=logprobs,
            )
        ],
        usage=usage,
        prompt_ids=prompt_ids,
        prompt_ids_source="wire",
        wire=[record],
        worker_metadata=worker_metadata,
    )


def http_capture(
    case: Case,
    text: str = ANSWER,
    finish_reason: str = "stop",
    matched_stop: int | str | None = END_OF_TURN,
    prompt_tokens: int = len(REFERENCE_PROMPT_IDS),
    completion_tokens: int | None = None,
) -> Capture:
    """Build what the replay records in HTTP mode: text and usage, ids re-encoded from text."""
    ids = answer_ids(text) if text else []
    if completion_tokens is None:
        completion_tokens = len(ids) + (1 if isinstance(matched_stop, int) else 0)
    return Capture(
        case_id=case.id,
        mode="http",
        request=case.chat_request(),
        status=200,
        choices=[
            ChoiceCapture(
                index=0,
                text=text,
                output_ids=ids,
                output_ids_source="retokenized",
                finish_reason=finish_reason,
                matched_stop=matched_stop,
            )
        ],
        usage={
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    )


def direct_capture(
    case: Case,
    output_ids: list[int] | None = None,
    finish_reason: str = "stop",
    matched_stop: int | str | None = END_OF_TURN,
    logprobs: list[TokenLogprob] | None = None,
) -> Capture:
    """Build what the server's native /generate returns for the reference prompt ids."""
    reference = make_reference(case)
    output_ids = list(answer_ids() + [END_OF_TURN] if output_ids is None else output_ids)
    return Capture(
        case_id=case.id,
        mode="direct",
        request={"input_ids": reference.prompt_ids},
        status=200,
        choices=[
            ChoiceCapture(
                index=0,
                text=tokenizer().decode(output_ids, skip_special_tokens=True),
                output_ids=output_ids,
                output_ids_source="engine",
                finish_reason=finish_reason,
                matched_stop=matched_stop,
                logprobs=logprobs,
            )
        ],
        usage={"prompt_tokens": len(reference.prompt_ids), "completion_tokens": len(output_ids)},
        prompt_ids=list(reference.prompt_ids),
        prompt_ids_source="engine",
    )


def reported_captures(case: Case, original_text: str | None = None) -> dict[str, Capture]:
    """Return the captures of the user report: gRPC returns only <end_of_turn>, HTTP returns text."""
    reference = make_reference(case)
    without_bos = reference.prompt_ids[1:]
    if original_text is None:
        original_text = reference.prompt_text[len("<bos>") :]
    grpc = grpc_capture(
        case,
        prompt_ids=without_bos,
        output_ids=[END_OF_TURN],
        text="",
        usage={"prompt_tokens": 13, "completion_tokens": 1, "total_tokens": 14},
        original_text=original_text,
        worker_metadata={"url": "grpc://127.0.0.1:30001", "metadata": {"vocab_size": 128256, "bos_token_id": 1}},
    )
    http = http_capture(case, prompt_tokens=14, completion_tokens=87)
    return {"grpc": grpc, "http": http}


def streamed_grpc_capture(case):
    """Return a gRPC capture of a streamed call: ids in chunks, the last delta in the completion."""
    ids = answer_ids() + [END_OF_TURN]
    capture = grpc_capture(case, output_ids=ids)
    record = capture.wire[0]
    record.request.stream = True
    record.chunks = [{"index": 0, "token_ids": [token_id], "prompt_tokens": 14} for token_id in ids[:-1]]
    record.completions[0].output_ids = ids[-1:]
    # The choice holds only what the completion carried, as a replay that reads it would.
    capture.choices[0].output_ids = ids[-1:]
    return capture
