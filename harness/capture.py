"""Captures: what one mode returned for one case, as token streams and response fields.

A capture is the only thing the diff sees of a stack. It holds what the router sent back to
the client (text, finish_reason, matched_stop, usage, logprobs) and, where a tap sat on the
gRPC wire, the prompt ids and output ids that crossed it. Every field says where it came
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

# Where a list of ids came from. "wire" and "engine" are observed; "retokenized" is derived
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
    status_code: str | None = None


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
    )
