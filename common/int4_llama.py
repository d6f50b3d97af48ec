"""A compact decoder for a Llama whose layers are 4-bit (``common/int4_draft.py``): one sequence.

Why: with its products in 4 bits, a SmolLM2-135M step spends as long in transformers' per-layer
bookkeeping (cache objects, masks, separate q/k/v and gate/up products, six-op norms) as in
the products themselves. This decoder runs the same network as a few fused steps per layer:
one product for q, k and v, one for gate and up, torch's fused RMS norm, rotary tables from the
model's own rotary module, and a key/value buffer per sequence that grows by doubling. One
SmolLM2 step: 13.6 ms through transformers, 10.8 ms here (one thread;
``benchmarks/results/int4_draft.md``).

It is a draft's decoder: its numbers only choose what gets proposed, the target checks every
token, so a difference in the last bits (fused versus separate products) cannot reach the
output. ``Int4Llama.of`` accepts only what it reproduces: a ``llama`` model without biases,
every projection 4-bit; anything else keeps transformers' own forward.

Terms and shapes (one sequence; T new tokens after S cached ones; L layers, Hq query heads,
Hkv key/value heads, D per head):
  h        [T, hidden]          the residual stream
  qkv      [T, (Hq + 2 Hkv) D]  one product's output, split into q, k, v
  keys     [L, Hkv, capacity, D] the buffer; positions [0, S + T) are valid after a step
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from common.int4_draft import Int4Linear, stack_int4

FIRST_CAPACITY = 256


@dataclass
class KeyValues:
    """One sequence's keys and values; ``length`` positions are valid (truncate by lowering it)."""

    keys: torch.Tensor  # [L, Hkv, capacity, D]
    values: torch.Tensor  # [L, Hkv, capacity, D]
    length: int = 0

    def reserve(self, total: int) -> None:
        capacity = self.keys.shape[2]
        if total <= capacity:
            return
        while capacity < total:
            capacity *= 2
        grown_keys = self.keys.new_zeros(*self.keys.shape[:2], capacity, self.keys.shape[3])
        grown_values = torch.zeros_like(grown_keys)
        grown_keys[:, :, :self.length] = self.keys[:, :, :self.length]
        grown_values[:, :, :self.length] = self.values[:, :, :self.length]
        self.keys, self.values = grown_keys, grown_values


@dataclass
class _Layer:
    qkv: Int4Linear | tuple[Int4Linear, ...]  # stacked when the kernel's layout allows
    out: Int4Linear
    gate_up: Int4Linear | tuple[Int4Linear, ...]
    down: Int4Linear
    attention_norm: torch.Tensor  # [hidden]
    mlp_norm: torch.Tensor  # [hidden]


def _product(layer: Int4Linear | tuple[Int4Linear, ...], x: torch.Tensor) -> torch.Tensor:
    return layer(x) if isinstance(layer, Int4Linear) else torch.cat([part(x) for part in layer], -1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding in transformers' half-split form. x [T, heads, D], cos/sin [T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


@dataclass
class Int4Llama:
    """The decoder; build it with ``Int4Llama.of(model)``, then ``step`` a ``KeyValues`` along."""

    model: Any  # the transformers model: its embedding, rotary module and output layer
    layers: list[_Layer] = field(default_factory=list)
    query_heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    intermediate: int = 0
    eps: float = 1e-5

    @classmethod
    def of(cls, model: Any) -> Int4Llama | None:
        """The compact decoder of a 4-bit Llama, or None when the model is anything else."""
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", "") != "llama":
            return None
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            return None
        blocks = model.model.layers
        projections = [getattr(block.self_attn, name) for block in blocks
                       for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        projections += [getattr(block.mlp, name) for block in blocks
                        for name in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(layer, Int4Linear) for layer in projections):
            return None
        if getattr(config, "hidden_act", "silu") != "silu":
            return None
        heads = config.num_attention_heads
        decoder = cls(model=model, query_heads=heads, kv_heads=config.num_key_value_heads,
                      head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                      intermediate=config.intermediate_size, eps=config.rms_norm_eps)
        for block in blocks:
            attention, mlp = block.self_attn, block.mlp
            decoder.layers.append(_Layer(
                qkv=stack_int4([attention.q_proj, attention.k_proj, attention.v_proj]), out=attention.o_proj,
                gate_up=stack_int4([mlp.gate_proj, mlp.up_proj]), down=mlp.down_proj,
                attention_norm=block.input_layernorm.weight.detach(),
                mlp_norm=block.post_attention_layernorm.weight.detach()))
        return decoder

    def new_cache(self) -> KeyValues:
        shape = (len(self.layers), self.kv_heads, FIRST_CAPACITY, self.head_dim)
        return KeyValues(torch.zeros(shape), torch.zeros(shape))

    def _norm(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(h, (h.shape[-1],), weight, self.eps)

    def _attention(self, index: int, layer: _Layer, x: torch.Tensor, cache: KeyValues,
                   rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        steps, start = x.shape[0], cache.length
        q_width, kv_width = self.query_heads * self.head_dim, self.kv_heads * self.head_dim
        qkv = _product(layer.qkv, x)  # [T, (Hq + 2 Hkv) D]
        q = _rotate(qkv[:, :q_width].view(steps, self.query_heads, self.head_dim), *rotary)
        k = _rotate(qkv[:, q_width:q_width + kv_width].view(steps, self.kv_heads, self.head_dim), *rotary)
        v = qkv[:, q_width + kv_width:].view(steps, self.kv_heads, self.head_dim)
        cache.keys[index, :, start:start + steps] = k.transpose(0, 1)
        cache.values[index, :, start:start + steps] = v.transpose(0, 1)
        seen = start + steps
        keys, values = cache.keys[index:index + 1, :, :seen], cache.values[index:index + 1, :, :seen]
        attended = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values,
                                                  attn_mask=mask, enable_gqa=True)  # [1, Hq, T, D]
        return layer.out(attended[0].transpose(0, 1).reshape(steps, q_width))

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        gate_up = _product(layer.gate_up, x)  # [T, 2 intermediate]
        return layer.down(F.silu(gate_up[:, :self.intermediate]) * gate_up[:, self.intermediate:])

    @torch.inference_mode()
    def step(self, cache: KeyValues, tokens: list[int]) -> torch.Tensor:  # [V] float32
        """Run ``tokens`` on top of the cache (extending it); the last position's logits."""
        start, steps = cache.length, len(tokens)
        cache.reserve(start + steps)
        inner = self.model.model
        h = inner.embed_tokens(torch.tensor(tokens))  # [T, hidden]
        positions = torch.arange(start, start + steps)[None]
        cos, sin = inner.rotary_emb(h[None], positions)  # [1, T, D] each, scaling applied
        rotary = (cos[0, :, None], sin[0, :, None])
        # each new token sees the cache and the new tokens up to itself; one token sees everything
        mask = None if steps == 1 else torch.ones(steps, start + steps, dtype=torch.bool).tril(start)
        for index, layer in enumerate(self.layers):
            h = h + self._attention(index, layer, self._norm(h, layer.attention_norm), cache, rotary, mask)
            h = h + self._mlp(layer, self._norm(h, layer.mlp_norm))
        cache.length = start + steps
        return self.model.get_output_embeddings()(self._norm(h[-1:], inner.norm.weight))[0].float()
