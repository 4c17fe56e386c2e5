"""The reference: what HF transformers says the prompt and the stop set of a case are.

PLACEHOLDER: ``build_reference`` is being written; the dataclass is the contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reference:
    case_id: str
    model_dir: str
    # The chat template rendered by transformers with add_generation_prompt=True, and its ids
    # encoded without adding special tokens again (the template writes <bos> itself), which
    # is how sglang's HTTP server builds the prompt.
    prompt_text: str
    prompt_ids: list[int]
    # The ids that end generation when the case sets no stop ids of its own: EOS ids from
    # generation_config.json and the tokenizer, each with where it was found.
    stop_ids: list[int]
    stop_id_sources: dict[int, list[str]]
    bos_id: int | None
    eos_ids: list[int]
    pad_id: int | None
    vocab_size: int
    model_type: str
    architectures: list[str]
    max_context_length: int | None
    # The generation prompt the template appends, as ids (e.g. "<start_of_turn>model\n").
    generation_prompt_ids: list[int] = field(default_factory=list)
    # Id -> token text for every special (added) token.
    special_tokens: dict[int, str] = field(default_factory=dict)
    # The case's own stop strings and stop ids, kept here so the diff needs only this object.
    stop_strings: list[str] = field(default_factory=list)
    request_stop_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        data = asdict(self)
        data["stop_id_sources"] = {str(k): v for k, v in self.stop_id_sources.items()}
        data["special_tokens"] = {str(k): v for k, v in self.special_tokens.items()}
        return data
