"""Sampling parameters and the sampler, following sglang 0.5.7's semantics.

Sources read (sglang 0.5.7 wheel): ``srt/sampling/sampling_params.py`` (defaults and the
temperature-0 rule), ``srt/layers/sampler.py`` (order of operations, which logprobs are
returned), ``srt/sampling/penaltylib/`` (frequency, presence and min_new_tokens penalties)
and ``srt/entrypoints/grpc_server.py`` (how proto3 fields become parameters).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SAMPLING_EPS = 1e-6


class InvalidParams(ValueError):
    """A sampling parameter is out of range; the message names it."""


@dataclass
class SamplingConfig:
    """One request's sampling parameters after sglang's normalization."""

    max_new_tokens: int | None = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    # None means the whole vocabulary (sglang's top_k = -1).
    top_k: int | None = None
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # NOTE: sglang 0.5.7 accepts repetition_penalty but no penalizer applies it (penaltylib has
    # only frequency, presence and min_new_tokens), so the engine stores it and ignores it too.
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: set[int] = field(default_factory=set)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Maximum stop string length, counted in characters on the gRPC path (sglang normalizes there
    # without a tokenizer) and in tokens on the HTTP path.
    stop_str_max_len: int = 0

    @property
    def greedy(self) -> bool:
        return self.top_k == 1

    def normalize(self) -> "SamplingConfig":
        """Apply sglang's rules: temperature near 0 means greedy, top_k -1 means all tokens."""
        if 0 <= self.temperature < SAMPLING_EPS:
            self.temperature = 1.0
            self.top_k = 1
        if self.top_k is not None and self.top_k < 0:
            self.top_k = None
        return self

    def verify(self, vocab_size: int) -> None:
        """Raise InvalidParams like sglang's SamplingParams.verify (run on the HTTP path only)."""
        if self.temperature < 0.0:
            raise InvalidParams(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidParams(f"top_p must be in (0, 1], got {self.top_p}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidParams(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidParams(f"top_k must be -1 (disable) or at least 1, got {self.top_k}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise InvalidParams(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise InvalidParams(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not 0.0 <= self.repetition_penalty <= 2.0:
            raise InvalidParams(f"repetition_penalty must be in [0, 2], got {self.repetition_penalty}.")
        if self.min_new_tokens < 0:
            raise InvalidParams(f"min_new_tokens must be at least 0, got {self.min_new_tokens}.")
        if self.max_new_tokens is not None:
            if self.max_new_tokens < 0:
                raise InvalidParams(f"max_new_tokens must be at least 0, got {self.max_new_tokens}.")
            if self.min_new_tokens > self.max_new_tokens:
                raise InvalidParams(
                    f"min_new_tokens must be in [0, max_new_tokens({self.max_new_tokens})], got {self.min_new_tokens}."
                )
        for token_id in self.logit_bias:
            if not 0 <= token_id < vocab_size:
                raise InvalidParams(f"logit_bias must have keys in [0, {vocab_size - 1}], got {token_id}.")


@dataclass
class SampleResult:
    token_id: int
    # log-probability of the chosen token and the top alternatives, when requested
    logprob: float | None = None
    top_values: list[float] = field(default_factory=list)
    top_ids: list[int] = field(default_factory=list)


class Sampler:
    """Per-sequence sampler state: output token counts for penalties and the random generator."""

    def __init__(self, config: SamplingConfig, vocab_size: int, min_tokens_stop_ids: set[int], seed: int | None):
        self.config = config
        self.vocab_size = vocab_size
        self.counts: torch.Tensor | None = None
        if config.frequency_penalty or config.presence_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32)
        self.min_tokens_stop_ids = sorted(i for i in min_tokens_stop_ids if 0 <= i < vocab_size)
        self.bias: torch.Tensor | None = None
        if config.logit_bias:
            self.bias = torch.zeros(vocab_size, dtype=torch.float32)
            for token_id, value in config.logit_bias.items():
                self.bias[token_id] = value
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    def sample(self, logits: torch.Tensor, generated: int, logprob_top: int | None) -> SampleResult:
        """Choose the next token from float32 logits; ``logprob_top`` None means no logprobs."""
        config = self.config
        logits = logits[: self.vocab_size].clone()

        # Penalties, then logit bias, as sglang's penalizer orchestrator and sampling info apply them.
        if self.counts is not None:
            logits -= self.counts * config.frequency_penalty
            logits -= (self.counts > 0).float() * config.presence_penalty
        if generated < config.min_new_tokens and self.min_tokens_stop_ids:
            logits[self.min_tokens_stop_ids] = float("-inf")
        if self.bias is not None:
            logits += self.bias

        if config.greedy:
            token_id = int(torch.argmax(logits))
            logprobs = torch.log_softmax(logits, dim=-1) if logprob_top is not None else None
        else:
            probs = torch.softmax(logits / config.temperature, dim=-1)
            token_id = self._draw(probs)
            logprobs = None
            if logprob_top is not None:
                logprobs = torch.log(probs).clamp(min=torch.finfo(probs.dtype).min)

        if self.counts is not None:
            self.counts[token_id] += 1

        result = SampleResult(token_id=token_id)
        if logprobs is not None:
            result.logprob = float(logprobs[token_id])
            if logprob_top:
                values, ids = torch.topk(logprobs, min(logprob_top, logprobs.shape[0]))
                result.top_values = [float(v) for v in values]
                result.top_ids = [int(i) for i in ids]
        return result

    def _draw(self, probs: torch.Tensor) -> int:
        """Draw from ``probs`` after top-k, top-p and min-p filtering (sglang's torch backend order)."""
        config = self.config
        if config.top_k is None and config.top_p >= 1.0 and config.min_p <= 0.0:
            return int(torch.multinomial(probs, 1, generator=self.generator))
        sorted_probs, sorted_ids = torch.sort(probs, descending=True)
        if config.top_k is not None:
            sorted_probs[config.top_k :] = 0.0
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        sorted_probs[(cumulative - sorted_probs) > config.top_p] = 0.0
        if config.min_p > 0.0:
            sorted_probs[sorted_probs < sorted_probs[0] * config.min_p] = 0.0
        if float(sorted_probs.sum()) <= 0.0:
            # top_k 0 or top_p 0 reach here through gRPC, which sglang 0.5.7 does not verify;
            # keep the most likely token rather than divide by zero.
            return int(sorted_ids[0])
        choice = torch.multinomial(sorted_probs, 1, generator=self.generator)
        return int(sorted_ids[choice])
