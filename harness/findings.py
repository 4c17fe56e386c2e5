"""Findings: what the diff concluded, in the terms a maintainer fixes bugs in.

A finding names the layer at fault, the side that deviates, the position of the first
deviating token, the expected and observed ids with their decoded text, and one sentence
that explains it. Findings are derived from captures only; nothing outside the observed
streams and the reference may create one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Layer(str, Enum):
    """The part of the serving path a finding points at."""

    CHAT_TEMPLATE = "chat template"
    TOKENIZER = "tokenizer"
    STOP_SET = "stop set"
    SAMPLING = "sampling params"
    DETOKENIZER = "detokenizer"
    WORKER_METADATA = "worker metadata"
    TRANSPORT = "transport"
    # The router's own response fields (usage, finish_reason) disagree with what it observed.
    RESPONSE = "response assembly"


class Severity(str, Enum):
    BUG = "bug"
    # Both sides chose among near-equal candidates: each side's token is in the other's top-k.
    NEAR_TIE = "near-tie"
    # Worth reading, but no evidence of a defect (e.g. sampled streams that differ).
    INFO = "info"


class Kind(str, Enum):
    """Every kind of disagreement the diff can name."""

    MISSING_BOS = "missing-bos"
    EXTRA_BOS = "extra-bos"
    GENERATION_PROMPT_MISSING = "generation-prompt-missing"
    TEMPLATE_DRIFT = "template-drift"
    PROMPT_COUNT_MISMATCH = "prompt-count-mismatch"
    STOP_SET_MISSING = "stop-set-missing"
    STOP_SET_EXTRA = "stop-set-extra"
    SPURIOUS_STOP = "spurious-stop"
    STOP_STRING_ONE_SIDE = "stop-string-one-side"
    DETOKENIZER_DRIFT = "detokenizer-drift"
    FINISH_MISMATCH = "finish-mismatch"
    USAGE_MISMATCH = "usage-mismatch"
    WORKER_METADATA_MISMATCH = "worker-metadata-mismatch"
    SAMPLING_PARAM_MISMATCH = "sampling-param-mismatch"
    OUTPUT_DIVERGENCE = "output-divergence"
    NEAR_TIE = "near-tie"
    REQUEST_FAILED = "request-failed"


@dataclass
class Finding:
    """One disagreement between a mode and the reference, or between two modes."""

    case_id: str
    kind: Kind
    layer: Layer
    # The mode that deviates ("grpc", "http", "direct"), or "both".
    side: str
    explanation: str
    severity: Severity = Severity.BUG
    # What the position counts: "prompt" ids, "output" ids, or None for a field-level finding.
    stream: str | None = None
    position: int | None = None
    expected: Any = None
    observed: Any = None
    expected_text: str | None = None
    observed_text: str | None = None
    # What the finding was compared against: "reference", "http", "direct", ...
    baseline: str = "reference"
    choice_index: int = 0
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["kind"] = self.kind.value
        data["layer"] = self.layer.value
        data["severity"] = self.severity.value
        return data

    @property
    def headline(self) -> str:
        """Return a one-line summary: kind, side, layer and position."""
        where = ""
        if self.position is not None:
            where = f" at {self.stream or 'output'} position {self.position}"
        return f"{self.kind.value} [{self.side}, {self.layer.value}]{where}: {self.explanation}"
