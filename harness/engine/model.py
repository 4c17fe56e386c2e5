"""Gemma 3 text model on the CPU: weights, prefill, KV-cache decode and model metadata.

The weights come from an HF-format folder through transformers, so the numbers are the ones
transformers computes. The forward pass is our own, for speed, because one token of decode
reads every weight once. On the 2-core machine this was measured on, torch's
matrix-vector kernel read an (out, in) weight at about 12 GB/s and the transposed (in, out)
copy at about 21 GB/s. So every projection, and the tied embedding used as the output head,
is kept transposed, q/k/v and gate/up are fused, and the KV cache is preallocated per
sequence. Greedy output stays token for token equal to transformers' ``generate``
(checked by tests/test_engine.py).

The output head is the largest read (262144 x 640). torch's own threads did not speed up
its matrix-vector product (about 20 GB/s with 1 or 2 threads), while the same product split
by vocabulary columns over 2 Python threads, each running torch with 1 thread, read about
44 GB/s. So torch runs single-threaded and the head is split over a small thread pool. The
smaller per-layer products stay single-threaded, because a pool dispatch per product cost
more than it saved (measured with benchmarks/engine_decode.py on a 2-core machine).
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("gemma3_text",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """The model folder is missing, incomplete or contains an unsupported architecture."""


@dataclass
class ModelMetadata:
    """Model facts that GetModelInfo and /model_info report, read from the folder's own files."""

    model_path: str
    served_model_name: str
    model_type: str
    architectures: list[str]
    vocab_size: int
    # EOS ids as sglang collects them: config.json's eos_token_id plus generation_config.json's.
    eos_token_ids: list[int]
    bos_token_id: int | None
    pad_token_id: int | None
    max_context_length: int
    # The tokenizer's own eos_token id (sglang's min_new_tokens mask uses this one only).
    tokenizer_eos_token_id: int | None = None

    @property
    def max_req_input_len(self) -> int:
        # sglang reserves room for at least one generated token.
        return self.max_context_length - 1


def _as_id_list(value: object) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(item) for item in value]  # type: ignore[union-attr]


def read_metadata(model_dir: Path, served_model_name: str | None, context_length: int | None) -> ModelMetadata:
    """Read vocab size, special ids and context length from config.json and generation_config.json."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"model folder {model_dir} has no config.json; pass an HF-format folder to --model-dir")
    config = json.loads(config_path.read_text())
    text_config = config.get("text_config", config)
    generation_path = model_dir / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}

    eos_ids: list[int] = []
    for source in (_as_id_list(text_config.get("eos_token_id")), _as_id_list(generation.get("eos_token_id"))):
        for token_id in source:
            if token_id not in eos_ids:
                eos_ids.append(token_id)

    max_positions = int(text_config.get("max_position_embeddings") or 0)
    if context_length is not None:
        max_context = context_length
    elif max_positions:
        max_context = max_positions
    else:
        raise ModelLoadError(f"{config_path} has no max_position_embeddings; pass --context-length")

    return ModelMetadata(
        model_path=str(model_dir),
        served_model_name=served_model_name or config.get("_name_or_path") or str(model_dir),
        model_type=str(text_config.get("model_type") or config.get("model_type") or ""),
        architectures=list(config.get("architectures") or []),
        vocab_size=int(text_config["vocab_size"]),
        eos_token_ids=eos_ids,
        bos_token_id=text_config.get("bos_token_id", generation.get("bos_token_id")),
        pad_token_id=text_config.get("pad_token_id", generation.get("pad_token_id")),
        max_context_length=max_context,
    )


@dataclass
class _Layer:
    qkv_t: torch.Tensor  # (hidden, q + k + v), transposed and fused
    o_t: torch.Tensor
    gate_up_t: torch.Tensor
    down_t: torch.Tensor
    input_norm: torch.Tensor  # 1 + weight, in float32, as Gemma's RMSNorm applies it
    post_attention_norm: torch.Tensor
    pre_feedforward_norm: torch.Tensor
    post_feedforward_norm: torch.Tensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    layer_type: str
    sliding_window: int | None
    inv_freq: torch.Tensor
    attention_scaling: float


@dataclass
class KVCache:
    """Keys and values of one sequence: (layers, capacity, kv_heads, head_dim) each."""

    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def clone(self) -> "KVCache":
        return KVCache(self.keys.clone(), self.values.clone(), self.length)


class GemmaModel:
    """A Gemma 3 text model with a preallocated per-sequence KV cache."""

    def __init__(self, model_dir: Path, dtype: str = "float32", threads: int | None = None):
        """Load the weights; ``threads`` is how many threads compute the output head (default: CPU count)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        if dtype not in DTYPES:
            raise ModelLoadError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        self.head_threads = max(1, threads or os.cpu_count() or 1)
        torch.set_num_threads(1)
        self.dtype = DTYPES[dtype]

        config = AutoConfig.from_pretrained(model_dir)
        config = getattr(config, "text_config", config)
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"model folder {model_dir} has model_type {config.model_type!r}; "
                f"this engine runs only {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.config = config
        hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype)
        hf_model.eval()
        self._extract(hf_model)
        del hf_model

    def _extract(self, hf_model: torch.nn.Module) -> None:
        config = self.config
        body = hf_model.model
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.num_layers = config.num_hidden_layers
        self.vocab_size = config.vocab_size
        self.eps = config.rms_norm_eps
        self.final_softcap = config.final_logit_softcapping
        self.attn_softcap = config.attn_logit_softcapping
        self.scaling = config.query_pre_attn_scalar**-0.5

        with torch.no_grad():
            self.embedding = body.embed_tokens.weight.detach().clone()
            self.embed_scale = body.embed_tokens.embed_scale.to(self.dtype)
            # The output head (tied to the embedding in Gemma 3) transposed to (hidden, vocab)
            # and cut by vocabulary columns, one part per head thread.
            head = hf_model.lm_head.weight.detach()
            part_size = -(-head.shape[0] // self.head_threads)
            self.lm_head_parts = [part.t().contiguous() for part in head.split(part_size, dim=0)]
            self.final_norm = 1.0 + body.norm.weight.detach().float()
            rotary = body.rotary_emb
            self.layers = []
            for index, layer in enumerate(body.layers):
                attn = layer.self_attn
                layer_type = config.layer_types[index]
                qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], dim=0)
                gate_up = torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight], dim=0)
                self.layers.append(
                    _Layer(
                        qkv_t=qkv.t().contiguous(),
                        o_t=attn.o_proj.weight.detach().t().contiguous(),
                        gate_up_t=gate_up.t().contiguous(),
                        down_t=layer.mlp.down_proj.weight.detach().t().contiguous(),
                        input_norm=1.0 + layer.input_layernorm.weight.detach().float(),
                        post_attention_norm=1.0 + layer.post_attention_layernorm.weight.detach().float(),
                        pre_feedforward_norm=1.0 + layer.pre_feedforward_layernorm.weight.detach().float(),
                        post_feedforward_norm=1.0 + layer.post_feedforward_layernorm.weight.detach().float(),
                        q_norm=1.0 + attn.q_norm.weight.detach().float(),
                        k_norm=1.0 + attn.k_norm.weight.detach().float(),
                        layer_type=layer_type,
                        sliding_window=attn.sliding_window,
                        inv_freq=getattr(rotary, f"{layer_type}_inv_freq").detach().float().clone(),
                        attention_scaling=float(getattr(rotary, f"{layer_type}_attention_scaling")),
                    )
                )
        self._head_pool = None
        if len(self.lm_head_parts) > 1:
            self._head_pool = ThreadPoolExecutor(len(self.lm_head_parts), thread_name_prefix="engine-head")
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim

    # -- cache ---------------------------------------------------------------------------

    def new_cache(self, capacity: int) -> KVCache:
        shape = (self.num_layers, max(capacity, 1), self.num_kv_heads, self.head_dim)
        return KVCache(torch.empty(shape, dtype=self.dtype), torch.empty(shape, dtype=self.dtype))

    def _ensure_capacity(self, cache: KVCache, needed: int) -> None:
        if needed <= cache.capacity:
            return
        capacity = max(needed, cache.capacity * 2)
        for name in ("keys", "values"):
            old = getattr(cache, name)
            grown = torch.empty((old.shape[0], capacity, *old.shape[2:]), dtype=old.dtype)
            grown[:, : cache.length] = old[:, : cache.length]
            setattr(cache, name, grown)

    # -- forward -------------------------------------------------------------------------

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * weight).to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @torch.inference_mode()
    def forward(self, token_ids: list[int], cache: KVCache) -> torch.Tensor:
        """Run ``token_ids`` after the cached positions; return float32 logits of the last one."""
        count = len(token_ids)
        start = cache.length
        self._ensure_capacity(cache, start + count)
        ids = torch.tensor(token_ids, dtype=torch.long)
        hidden = F.embedding(ids, self.embedding) * self.embed_scale  # (T, hidden)
        positions = torch.arange(start, start + count, dtype=torch.float32)
        end = start + count
        rope_by_layer_type: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        for index, layer in enumerate(self.layers):
            rope = rope_by_layer_type.get(layer.layer_type)
            if rope is None:
                freqs = positions[:, None] * layer.inv_freq[None, :]
                emb = torch.cat((freqs, freqs), dim=-1)
                rope = (
                    (emb.cos() * layer.attention_scaling).to(self.dtype)[:, None, :],
                    (emb.sin() * layer.attention_scaling).to(self.dtype)[:, None, :],
                )
                rope_by_layer_type[layer.layer_type] = rope
            cos, sin = rope

            residual = hidden
            x = self._rms_norm(hidden, layer.input_norm)
            qkv = x @ layer.qkv_t
            q = qkv[:, : self.q_size].view(count, self.num_heads, self.head_dim)
            k = qkv[:, self.q_size : self.q_size + self.kv_size].view(count, self.num_kv_heads, self.head_dim)
            v = qkv[:, self.q_size + self.kv_size :].view(count, self.num_kv_heads, self.head_dim)
            q = self._rotate(self._rms_norm(q, layer.q_norm), cos, sin)
            k = self._rotate(self._rms_norm(k, layer.k_norm), cos, sin)
            cache.keys[index, start:end] = k
            cache.values[index, start:end] = v

            first = 0
            if layer.sliding_window is not None:
                # A query at position p attends to keys at positions > p - window.
                first = max(0, start - layer.sliding_window + 1)
            keys = cache.keys[index, first:end]  # (S, kv_heads, head_dim)
            values = cache.values[index, first:end]
            attn = self._attention(q, keys, values, start, first, layer.sliding_window)
            x = attn.reshape(count, self.q_size) @ layer.o_t
            x = self._rms_norm(x, layer.post_attention_norm)
            hidden = residual + x

            residual = hidden
            x = self._rms_norm(hidden, layer.pre_feedforward_norm)
            gate_up = x @ layer.gate_up_t
            gate, up = gate_up.chunk(2, dim=-1)
            x = (F.gelu(gate, approximate="tanh") * up) @ layer.down_t
            x = self._rms_norm(x, layer.post_feedforward_norm)
            hidden = residual + x

        cache.length = end
        last = self._rms_norm(hidden[-1:], self.final_norm)
        logits = self._output_head(last)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def _output_head(self, last: torch.Tensor) -> torch.Tensor:
        """Return float32 logits of one hidden state, the vocabulary parts computed in parallel."""
        if self._head_pool is None:
            return (last @ self.lm_head_parts[0])[0].float()
        futures = [self._head_pool.submit(torch.mm, last, part) for part in self.lm_head_parts]
        return torch.cat([future.result() for future in futures], dim=1)[0].float()

    def _attention(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        start: int,
        first: int,
        window: int | None,
    ) -> torch.Tensor:
        """Grouped-query attention of T queries over S cached keys; returns (T, heads, head_dim)."""
        count = q.shape[0]
        group = self.num_heads // self.num_kv_heads
        # (kv_heads, group * T, head_dim) queries against (kv_heads, S, head_dim) keys.
        qh = q.view(count, self.num_kv_heads, group, self.head_dim).permute(1, 2, 0, 3)
        qh = qh.reshape(self.num_kv_heads, group * count, self.head_dim)
        kh = keys.permute(1, 0, 2)
        vh = values.permute(1, 0, 2)
        scores = torch.matmul(qh, kh.transpose(1, 2)) * self.scaling
        if self.attn_softcap is not None:
            scores = torch.tanh(scores / self.attn_softcap) * self.attn_softcap
        # One query needs no mask: ``first`` already drops keys outside its window.
        if count > 1:
            query_pos = torch.arange(start, start + count).repeat(group)[:, None]
            key_pos = torch.arange(first, first + keys.shape[0])[None, :]
            allowed = key_pos <= query_pos
            if window is not None:
                allowed &= key_pos > query_pos - window
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, vh)  # (kv_heads, group * T, head_dim)
        out = out.view(self.num_kv_heads, group, count, self.head_dim).permute(2, 0, 1, 3)
        return out.reshape(count, self.num_heads, self.head_dim)


def sequence_capacity(prompt_len: int, max_new_tokens: int | None, context_length: int) -> int:
    """Return how many positions to preallocate for one sequence."""
    if max_new_tokens is None:
        return min(context_length, prompt_len + 256)
    return min(context_length, prompt_len + max_new_tokens)



__all__ = [
    "GemmaModel",
    "KVCache",
    "ModelLoadError",
    "ModelMetadata",
    "read_metadata",
    "sequence_capacity",
]
