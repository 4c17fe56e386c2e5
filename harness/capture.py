"""Captures: what one mode returned for one case, as token streams and response fields.

A capture is the only input the diff takes from a stack. It holds what the router sent back to
the client (text, finish_reason, matched_stop, usage, logprobs) and, where a tap sat on the
gRPC wire, the prompt ids and output ids that crossed it. Every field records where it came
from, so a finding never presents a derived value as an observed one.

Modes:
- ``grpc``: router in gRPC mode; prompt ids and output ids come from the tap (``wire``).
- ``http``: router in HTTP mode; the server tokenizes, so only usage counts are observed for
  the prompt, and output ids are the response text encoded again (``retokenized``) unless
  the server returned ids.
- ``direct``: the server's native ``/generate`` called with the reference prompt ids,
  bypassing every router; its output ids are the server's own.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

MODES = ("http", "grpc", "direct")

# Sources of a list of ids. "wire" and "engine" ids are observed; "retokenized" ids are derived
# from text and cannot show special tokens or tokenization differences.
ID_SOURCES = ("wire", "engine", "retokenized")


@dataclass
class TokenLogprob:
    """Logprob of one output token, with the top-k alternatives the server returned."""

    logprob: float
    token_id: int | None = None
    token: str | None = None
    # Alternatives as (token id or token text, logprob), best first. gRPC returns ids, the
    # OpenAI-compatible HTTP API returns token text.
    top: list[tuple[int | str, float]] = field(default_factory=list)


@dataclass
class ChoiceCapture:
    """One choice (``n`` > 1 gives several) of one response."""

    index: int
    text: str | None = None
    output_ids: list[int] | None = None
    output_ids_source: str | None = None
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class WireRequest:
    """A ``GenerateRequest`` as the tap saw it on its way from the router to the server."""

    request_id: str
    prompt_ids: list[int]
    original_text: str
    sampling_params: dict[str, Any]
    stream: bool
    return_logprob: bool = False
    top_logprobs_num: int = 0
    # Sampling fields present on the wire: nonzero fields without presence, and fields with
    # presence (e.g. max_new_tokens) that were set, even to 0.
    sampling_params_set: list[str] = field(default_factory=list)
    has_sampling_params: bool = True


@dataclass
class WireCompletion:
    """A ``GenerateComplete`` as the tap saw it on its way back to the router."""

    index: int
    output_ids: list[int]
    finish_reason: str
    matched_stop: int | str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None


@dataclass
class WireRecord:
    """One ``Generate`` call through the tap: the request, its stream chunks and completions."""

    request: WireRequest
    # Per streamed chunk: {"index": int, "token_ids": [...], "prompt_tokens": int, ...}
    chunks: list[dict[str, Any]] = field(default_factory=list)
    completions: list[WireCompletion] = field(default_factory=list)
    error: str | None = None
    # The gRPC status name the call ended with ("OK", "CANCELLED", "DEADLINE_EXCEEDED", ...).
    status_code: str | None = None
    # GenerateError.http_status_code, when the server sent a GenerateError.
    error_http_status: str | None = None
    # True when the router went away before the call ended.
    cancelled: bool = False
    # Unix time the call reached the tap, and its duration in seconds.
    started_at: float = 0.0
    elapsed_s: float = 0.0


@dataclass
class Capture:
    """Everything observed for one case in one mode."""

    case_id: str
    mode: str
    # The body the harness sent to the router (or, for ``direct``, to the server).
    request: dict[str, Any]
    status: int | None = None
    # Set when the call failed (HTTP error, connection error, timeout): the message as seen.
    error: str | None = None
    choices: list[ChoiceCapture] = field(default_factory=list)
    usage: dict[str, int] | None = None
    # Observed prompt ids: from the tap in gRPC mode, the harness's own ids in direct mode,
    # None in HTTP mode (the server tokenizes and returns no ids).
    prompt_ids: list[int] | None = None
    prompt_ids_source: str | None = None
    wire: list[WireRecord] = field(default_factory=list)
    # The worker entry the router reported in ``GET /workers`` for this mode, if any.
    worker_metadata: dict[str, Any] | None = None
    # The raw response: a JSON object, or the list of SSE data objects for a stream.
    raw: Any = None
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Capture":
        data = dict(data)
        data["choices"] = [_choice_from_dict(c) for c in data.get("choices", [])]
        data["wire"] = [_wire_from_dict(w) for w in data.get("wire", [])]
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _logprobs_from_list(items: list[dict[str, Any]] | None) -> list[TokenLogprob] | None:
    if items is None:
        return None
    return [
        TokenLogprob(
            logprob=item["logprob"],
            token_id=item.get("token_id"),
            token=item.get("token"),
            top=[(alt, lp) for alt, lp in item.get("top", [])],
        )
        for item in items
    ]


def _choice_from_dict(data: dict[str, Any]) -> ChoiceCapture:
    data = dict(data)
    data["logprobs"] = _logprobs_from_list(data.get("logprobs"))
    return ChoiceCapture(**data)


def _wire_from_dict(data: dict[str, Any]) -> WireRecord:
    completions = []
    for completion in data.get("completions", []):
        completion = dict(completion)
        completion["logprobs"] = _logprobs_from_list(completion.get("logprobs"))
        completions.append(WireCompletion(**completion))
    return WireRecord(
        request=WireRequest(**data["request"]),
        chunks=list(data.get("chunks", [])),
        completions=completions,
        error=data.get("error"),
        status_code=data.get("status_code"),
        error_http_status=data.get("error_http_status"),
        cancelled=data.get("cancelled", False),
        started_at=data.get("started_at", 0.0),
        elapsed_s=data.get("elapsed_s", 0.0),
    )


# ---------------------------------------------------------------------------------------------
# Building captures from responses
# ---------------------------------------------------------------------------------------------


def _openai_logprobs(choice: dict[str, Any]) -> list[TokenLogprob] | None:
    """Read the OpenAI ``logprobs.content`` list of a chat choice, or None when absent."""
    logprobs = choice.get("logprobs")
    if not logprobs or logprobs.get("content") is None:
        return None
    items = []
    for entry in logprobs["content"]:
        top = [(alt.get("token"), alt.get("logprob")) for alt in entry.get("top_logprobs") or []]
        items.append(TokenLogprob(logprob=entry.get("logprob"), token=entry.get("token"), top=top))
    return items


def capture_chat_response(
    case_id: str, mode: str, request: dict[str, Any], status: int, body: Any, elapsed_s: float
) -> Capture:
    """Build a capture from a non-streaming ``/v1/chat/completions`` response."""
    capture = Capture(case_id=case_id, mode=mode, request=request, status=status, raw=body, elapsed_s=elapsed_s)
    if status != 200 or not isinstance(body, dict) or "choices" not in body:
        capture.error = _error_message(status, body)
        return capture

    for choice in body["choices"]:
        message = choice.get("message") or {}
        capture.choices.append(
            ChoiceCapture(
                index=choice.get("index", 0),
                text=message.get("content") or "",
                finish_reason=choice.get("finish_reason"),
                matched_stop=choice.get("matched_stop"),
                logprobs=_openai_logprobs(choice),
            )
        )
    capture.choices.sort(key=lambda c: c.index)
    capture.usage = _usage(body.get("usage"))
    return capture


def capture_chat_stream(
    case_id: str, mode: str, request: dict[str, Any], status: int, events: list[Any], elapsed_s: float
) -> Capture:
    """Build a capture from the decoded ``data:`` objects of a streamed chat response."""
    capture = Capture(case_id=case_id, mode=mode, request=request, status=status, raw=events, elapsed_s=elapsed_s)
    if status != 200:
        capture.error = _error_message(status, events[0] if events else None)
        return capture

    choices: dict[int, ChoiceCapture] = {}
    for event in events:
        if not isinstance(event, dict):
            continue
        if "error" in event:
            capture.error = _error_message(status, event)
        if event.get("usage"):
            capture.usage = _usage(event["usage"])
        for delta_choice in event.get("choices") or []:
            index = delta_choice.get("index", 0)
            choice = choices.setdefault(index, ChoiceCapture(index=index, text=""))
            delta = delta_choice.get("delta") or {}
            if delta.get("content"):
                choice.text = (choice.text or "") + delta["content"]
            logprobs = _openai_logprobs(delta_choice)
            if logprobs:
                choice.logprobs = (choice.logprobs or []) + logprobs
            if delta_choice.get("finish_reason") is not None:
                choice.finish_reason = delta_choice["finish_reason"]
            if delta_choice.get("matched_stop") is not None:
                choice.matched_stop = delta_choice["matched_stop"]
    capture.choices = [choices[index] for index in sorted(choices)]
    if not capture.choices and capture.error is None:
        capture.error = "stream ended without any choice"
    return capture


def capture_generate_response(
    case_id: str,
    request: dict[str, Any],
    prompt_ids: list[int],
    status: int,
    body: Any,
    elapsed_s: float,
) -> Capture:
    """Build a ``direct`` capture from the server's native ``/generate`` response (one or a list)."""
    capture = Capture(
        case_id=case_id,
        mode="direct",
        request=request,
        status=status,
        raw=body,
        elapsed_s=elapsed_s,
        prompt_ids=list(prompt_ids),
        prompt_ids_source="engine",
    )
    outputs = body if isinstance(body, list) else [body]
    if status != 200 or not all(isinstance(o, dict) and "meta_info" in o for o in outputs):
        capture.error = _error_message(status, body)
        return capture

    prompt_tokens = completion_tokens = 0
    for index, output in enumerate(outputs):
        meta = output["meta_info"]
        finish = meta.get("finish_reason") or {}
        finish_type = finish.get("type") if isinstance(finish, dict) else finish
        capture.choices.append(
            ChoiceCapture(
                index=index,
                text=output.get("text"),
                output_ids=list(output.get("output_ids") or []),
                output_ids_source="engine",
                # The native API reports "stop" for matched stops and "length" for max tokens,
                # as the OpenAI API does; "abort" passes through.
                finish_reason=finish_type,
                matched_stop=finish.get("matched") if isinstance(finish, dict) else None,
                logprobs=_native_logprobs(meta),
            )
        )
        prompt_tokens = meta.get("prompt_tokens", prompt_tokens)
        completion_tokens += meta.get("completion_tokens", 0)
    capture.usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return capture


def _native_logprobs(meta: dict[str, Any]) -> list[TokenLogprob] | None:
    """Read sglang's ``output_token_logprobs`` ([logprob, id, text] triples) and top-k lists."""
    entries = meta.get("output_token_logprobs")
    if not entries:
        return None
    tops = meta.get("output_top_logprobs") or [None] * len(entries)
    items = []
    for entry, top in zip(entries, tops):
        alternatives = [(alt[1], alt[0]) for alt in (top or [])]
        items.append(TokenLogprob(logprob=entry[0], token_id=entry[1], token=entry[2] if len(entry) > 2 else None, top=alternatives))
    return items


def attach_wire(capture: Capture, records: list[WireRecord]) -> None:
    """Fill the observed prompt ids and output ids of a gRPC-mode capture from the tap's records.

    A chat request with ``n`` > 1 may reach the server as one Generate call with n set, or as
    several calls; completions are matched to choices by their index in either case.
    """
    capture.wire = list(records)
    generate_calls = [r for r in records if r.request.prompt_ids]
    if not generate_calls:
        return
    capture.prompt_ids = list(generate_calls[0].request.prompt_ids)
    capture.prompt_ids_source = "wire"

    # sglang 0.5.7 streams incremental output, so a streamed call carries its ids in the
    # chunks and only the last delta in its GenerateComplete. A non-streamed call carries
    # them all in the GenerateComplete.
    ids_by_index: dict[int, list[int]] = {}
    for call_number, record in enumerate(generate_calls):
        def choice_index(index: int) -> int:
            return call_number if len(generate_calls) > 1 and index == 0 else index

        if record.request.stream:
            for chunk in record.chunks:
                ids_by_index.setdefault(choice_index(int(chunk.get("index", 0))), []).extend(chunk.get("token_ids") or [])
        for completion in record.completions:
            ids_by_index.setdefault(choice_index(completion.index), []).extend(completion.output_ids)
    for index, ids in ids_by_index.items():
        choice = next((c for c in capture.choices if c.index == index), None)
        if choice is None:
            choice = ChoiceCapture(index=index)
            capture.choices.append(choice)
        choice.output_ids = [int(i) for i in ids]
        choice.output_ids_source = "wire"
    capture.choices.sort(key=lambda c: c.index)


def retokenize_outputs(capture: Capture, tokenizer: Any) -> None:
    """Derive output ids from the response text where nothing observed them (HTTP mode)."""
    for choice in capture.choices:
        if choice.output_ids is None and choice.text is not None:
            choice.output_ids = list(tokenizer.encode(choice.text, add_special_tokens=False))
            choice.output_ids_source = "retokenized"


def _usage(usage: Any) -> dict[str, int] | None:
    if not isinstance(usage, dict):
        return None
    return {key: value for key, value in usage.items() if isinstance(value, int)}


def _error_message(status: int | None, body: Any) -> str:
    """Summarize a failed response in one line: status and the server's own message."""
    detail = body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            detail = error.get("message") or error.get("code") or error
        else:
            detail = error
    text = detail if isinstance(detail, str) else json.dumps(detail)[:500]
    return f"HTTP {status}: {text}"
