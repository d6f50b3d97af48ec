"""A compact decoder for a Llama whose layers are 4-bit (``common/int4_draft.py``): one sequence.

Why: with its products in 4 bits, a SmolLM2-135M step spends as long in transformers' per-layer
bookkeeping (cache objects, masks, separate q/k/v and gate/up products, six-op norms) as in
the products themselves. This decoder runs the same network as a few fused steps per layer:
one product for q, k and v, one for gate and up, torch's fused RMS norm, q and k rotated
together by one roll with rotary tables from the model's own rotary module, each product's
bfloat16 output added to the float32 residual stream as it is (at one row every conversion is
an op of its own), and a key/value buffer per sequence that grows by doubling. The MLP's
``silu(gate) * up`` stays float32: in bfloat16 it cost 3 more rejected tokens over 12 held-out
Spec-Bench answers. Figures against transformers' forward of the same model:
``benchmarks/results/int4_draft.md``.

It is a draft's decoder: its numbers only choose what gets proposed, the target checks every
token, so a difference in the last bits (fused versus separate products) cannot reach the
output. ``Int4Llama.of`` accepts only what it reproduces: a ``llama`` model without biases,
every projection 4-bit; anything else keeps transformers' own forward.

Terms and shapes (one sequence; T new tokens after S cached ones; L layers, Hq query heads,
Hkv key/value heads, D per head):
  h        [T, hidden]          the residual stream, float32
  qkv      [T, (Hq + 2 Hkv) D]  one product's output, split into q, k, v (float32 for attention)
  keys     [L, Hkv, capacity, D] the buffer; positions [0, S + T) are valid after a step
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from common.int4_draft import ACTIVATIONS, Int4Linear, stack_int4

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
    """x [T, K] bfloat16 -> [T, N] bfloat16, the parts of an unstacked layer side by side."""
    if isinstance(layer, Int4Linear):
        return layer.product(x)
    return torch.cat([part.product(x) for part in layer], -1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding in transformers' half-split form, as one roll:
    rotate_half(x) * sin == roll(x, D/2) * signed_sin with the first half of sin negated.
    x [T, heads, D], cos/signed_sin [T, 1, D]."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


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

    def _norm(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # float32 -> bfloat16
        return F.rms_norm(h, (h.shape[-1],), weight, self.eps).to(ACTIVATIONS)

    def _attention(self, index: int, layer: _Layer, x: torch.Tensor, cache: KeyValues,
                   rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        steps, start = x.shape[0], cache.length
        heads = self.query_heads + self.kv_heads  # q and k: rotated together
        qkv = _product(layer.qkv, x).float().view(steps, heads + self.kv_heads, self.head_dim)
        qk = _rotate(qkv[:, :heads], *rotary)  # [T, Hq + Hkv, D]
        seen = start + steps
        cache.keys[index, :, start:seen] = qk[:, self.query_heads:].transpose(0, 1)
        cache.values[index, :, start:seen] = qkv[:, heads:].transpose(0, 1)
        keys, values = cache.keys[index:index + 1, :, :seen], cache.values[index:index + 1, :, :seen]
        queries = qk[:, :self.query_heads].transpose(0, 1)[None]  # [1, Hq, T, D]
        attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask,
                                                  enable_gqa=True)  # [1, Hq, T, D]
        return layer.out.product(attended[0].transpose(0, 1).reshape(steps, -1).to(ACTIVATIONS))

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        gate_up = _product(layer.gate_up, x).float()  # [T, 2 intermediate]
        return layer.down.product((F.silu(gate_up[:, :self.intermediate]) * gate_up[:, self.intermediate:])
                                  .to(ACTIVATIONS))

    @torch.inference_mode()
    def step(self, cache: KeyValues, tokens: list[int]) -> torch.Tensor:  # [V] float32
        """Run ``tokens`` on top of the cache (extending it); the last position's logits."""
        start, steps = cache.length, len(tokens)
        cache.reserve(start + steps)
        inner = self.model.model
        h = inner.embed_tokens(torch.tensor(tokens))  # [T, hidden] float32
        positions = torch.arange(start, start + steps)[None]
        cos, sin = inner.rotary_emb(h[None], positions)  # [1, T, D] each, scaling applied
        half = self.head_dim // 2
        signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], -1)
        rotary = (cos[0, :, None], signed_sin[0, :, None])
        # each new token sees the cache and the new tokens up to itself; one token sees everything
        mask = None if steps == 1 else torch.ones(steps, start + steps, dtype=torch.bool).tril(start)
        for index, layer in enumerate(self.layers):  # the residual stream stays float32
            h = h + self._attention(index, layer, self._norm(h, layer.attention_norm), cache, rotary, mask)
            h = h + self._mlp(layer, self._norm(h, layer.mlp_norm))
        cache.length = start + steps
        return self.model.get_output_embeddings()(self._norm(h[-1:], inner.norm.weight))[0].float()
