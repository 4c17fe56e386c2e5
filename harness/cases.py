"""YAML chat cases: the schema, loading and validation.

PLACEHOLDER: the loader and validator are being written; the dataclasses below are the
contract the rest of the harness builds on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Message:
    role: str
    content: str


@dataclass
class Sampling:
    """Sampling parameters of a case, with the OpenAI chat API's names and defaults."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    n: int = 1
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    ignore_eos: bool = False


@dataclass
class Case:
    id: str
    model: str
    messages: list[Message]
    sampling: Sampling = field(default_factory=Sampling)
    stream: bool = False
    modes: list[str] = field(default_factory=lambda: ["http", "grpc"])
    tags: list[str] = field(default_factory=list)
    description: str = ""
    # Where the case was defined, for error messages and pytest's reportinfo.
    path: str = ""
    line: int = 0

    @property
    def deterministic(self) -> bool:
        """Return True when output streams of two runs must be equal (greedy or seeded)."""
        return (self.sampling.temperature == 0) or (self.sampling.seed is not None)

    def chat_request(self) -> dict[str, Any]:
        """Build the ``/v1/chat/completions`` body this case sends, exactly as written."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in self.messages],
            "stream": self.stream,
        }
        sampling = self.sampling
        for name in ("temperature", "top_p", "top_k", "max_tokens", "seed", "top_logprobs"):
            value = getattr(sampling, name)
            if value is not None:
                body[name] = value
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.stop_token_ids:
            body["stop_token_ids"] = list(sampling.stop_token_ids)
        if sampling.n != 1:
            body["n"] = sampling.n
        if sampling.logprobs:
            body["logprobs"] = True
        if sampling.ignore_eos:
            body["ignore_eos"] = True
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        return body
