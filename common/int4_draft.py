"""A draft made of the target itself in 4-bit weights: torch's int4 CPU kernel, no training.

Why: a speculative draft pays when it agrees with the target often and costs a small part of a
target pass. A separately trained small draft is cheap but, trained on a 2-core machine, agrees
with SmolLM2-135M-Instruct at only ~0.29 of positions (``common/assets/smollm2_draft``). The
target's own network with its weights in 4 bits agrees at 0.988
(``benchmarks/results/int4_draft.md``) and, at one row, streams about an eighth of the float32
target's bytes: decoding one token is bound by memory, so it costs a
fraction of a target pass (figures in docs/drafters.md).

Terms:
  group     GROUP_SIZE consecutive inputs of one output row sharing one scale and one offset
  q         a weight's 4-bit code, 0..15; the weight it stands for is (q - 8) * scale + zero,
            the form torch's ``_weight_int4pack_mm_for_cpu`` computes
  grid      the 16 values a group can hold: min, min + step, ..., max, step = (max - min) / 15

SmolLM2-135M-Instruct comes as a GGUF file whose linear layers are Q4_1 (blocks of 32 inputs,
each holding a 16-value grid from its minimum), so the dequantised float32 target's layers
already lie on this module's grids: re-packing them loses nothing but the rounding of scale
and offset to bfloat16. Its output layer (the Q8_0 embedding, tied) goes to 8 bits per weight
with one scale per row (``_weight_int8pack_mm``): in 4 bits agreement falls from 0.988 to 0.916,
and it is a fifth of the model (``benchmarks/results/int4_draft.md``).

The products take bfloat16 inputs (the kernels' fast path) and give float32 back; the rest of
the model (norms, attention, softmax) stays float32. A draft's numbers only steer which tokens
get proposed: the target verifies each one, so the output is exact whatever the draft computes.
On anything but a CPU in float32, or a torch without these kernels, nothing changes.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

GROUP_SIZE = 32
ACTIVATIONS = torch.bfloat16
LEVELS = 15  # the largest 4-bit code
MIDPOINT = 8  # the kernel subtracts it from every code
PACK_ROWS = 16  # the int4 packer takes output rows in multiples of this
BLOCK_ROWS = 64  # ... and lays them out in tiles of this many (so tiles can be stacked)


def group_grids(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit codes of a float weight and its groups' scale and offset, rounding to the nearest level.

    weight [N, K] with K % GROUP_SIZE == 0 -> codes [N, K] int32 in 0..15, scale [N, K/G],
    zero [N, K/G] such that weight ~= (codes - 8) * scale + zero, exactly so for a weight
    already on its groups' grids (a dequantised Q4_1 layer).
    """
    rows, inputs = weight.shape
    groups = weight.float().reshape(rows, inputs // GROUP_SIZE, GROUP_SIZE)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / LEVELS).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, LEVELS)
    return codes.to(torch.int32).reshape(rows, inputs), scale, low + MIDPOINT * scale


class Int4Linear(nn.Module):
    """``nn.Linear`` (no bias) with 4-bit group-wise weights, run by torch's int4 CPU kernel."""

    def __init__(self, packed: torch.Tensor, scale_and_zero: torch.Tensor) -> None:
        super().__init__()
        self.out_features = packed.shape[0]
        self.in_features = scale_and_zero.shape[0] * GROUP_SIZE
        self.packed: torch.Tensor  # [N, K/2] uint8, the kernel's layout
        self.scale_and_zero: torch.Tensor  # [K/G, N, 2] bfloat16, the kernel's layout
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scale_and_zero", scale_and_zero, persistent=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> Int4Linear:
        codes, scale, zero = group_grids(weight.detach())
        return cls(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1),
                   torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(ACTIVATIONS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.product(x.reshape(-1, self.in_features).to(ACTIVATIONS))
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] bfloat16 -> [T, N] bfloat16: the kernel alone, for callers that keep
        bfloat16 between products (each conversion is an op of its own at one row)."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP_SIZE, self.scale_and_zero)


class Int8RowLinear(nn.Module):
    """``nn.Linear`` (no bias) with 8-bit weights and one scale per output row."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        scale = weight.detach().float().abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        self.codes: torch.Tensor
        self.scale: torch.Tensor
        self.register_buffer("codes", torch.round(weight.detach().float() / scale[:, None]).to(torch.int8),
                             persistent=False)
        self.register_buffer("scale", scale.to(ACTIVATIONS), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(ACTIVATIONS)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.codes, self.scale)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


@functools.cache
def int4_kernels_available() -> bool:
    """Whether this torch has both CPU kernels and they compute what the float product does."""
    ops = torch.ops.aten
    if not all(hasattr(ops, op) for op in ("_convert_weight_to_int4pack_for_cpu",
                                           "_weight_int4pack_mm_for_cpu", "_weight_int8pack_mm")):
        return False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=generator).to(ACTIVATIONS).float()
    weight = torch.randn(48, 64, generator=generator)
    try:
        with torch.inference_mode():
            got4, got8 = Int4Linear.from_weight(weight)(x), Int8RowLinear(weight)(x)
    except RuntimeError:
        return False
    want = x @ weight.T
    # 4 bits per weight: the grid's step is ~1/4 of a standard deviation, so the error is loose
    return (got4.shape == want.shape and torch.allclose(got4, want, atol=2.0)
            and torch.allclose(got8, want, atol=0.5))


def _quantisable(layer: nn.Module) -> bool:
    return (isinstance(layer, nn.Linear) and layer.bias is None
            and layer.in_features % GROUP_SIZE == 0 and layer.out_features % PACK_ROWS == 0)


def stack_int4(layers: list[Int4Linear]) -> Int4Linear | tuple[Int4Linear, ...]:
    """One layer computing ``layers`` side by side (outputs concatenated), when the packed layout
    allows: it tiles BLOCK_ROWS output rows at a time, so stacking whole tiles is stacking the
    packed tensors. Otherwise the layers themselves, to be run one after another."""
    if any(layer.out_features % BLOCK_ROWS or layer.in_features != layers[0].in_features for layer in layers):
        return tuple(layers)
    return Int4Linear(torch.cat([layer.packed for layer in layers]),
                      torch.cat([layer.scale_and_zero for layer in layers], 1))


def use_int4_weights(model: Any) -> int:
    """Re-pack a CPU float32 model's linear layers as 4-bit (its output layer as 8-bit); how many.

    The input embedding stays float32 even where the output layer shares its weight (a lookup
    reads one row). Idempotent; a layer with a bias or an odd shape stays as it is.
    """
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        return 0
    if not int4_kernels_available():
        return 0
    head = model.get_output_embeddings()
    changed = 0
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if not _quantisable(child):
                    continue
                weight = child.weight
                packed = Int8RowLinear(weight) if child is head else Int4Linear.from_weight(weight)
                setattr(parent, name, packed)
                changed += 1
    return changed
