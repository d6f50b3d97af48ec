"""Float32 linear layers through oneDNN on the CPU: the same product, a faster kernel.

Why: torch's CPU build sends a float32 ``F.linear`` to MKL's GEMM, which on this project's
machines (AMD EPYC with AVX-512) is far from what the memory allows at the row counts decoding
has. One torch thread, SmolLM2-135M's MLP weights (576 x 1,536), per product
(``benchmarks/results/cpu_linear.md``): MKL 0.168 ms at 1 row, 0.301 at 2 and 0.327 at 5;
oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, the kernel Inductor uses on the CPU)
0.103, 0.189 and 0.199, and about half MKL's time at prefill sizes. A SmolLM2 verifier pass over
1 to 9 rows then costs 1.12x to 1.46x less, and more rows cost less extra, which is what
speculation buys with.

The product stays float32 (no reduced precision anywhere); only the order of the sums differs,
as it already does between MKL's own kernels at different row counts. Where oneDNN loses (a
small weight at one or two rows, where its per-call cost shows) the layer keeps MKL's kernel:
the choice is by shape alone, never by timing, so a model's outputs do not depend on the
machine's load. ``use_onednn_linears`` checks once that the op exists and agrees with
``F.linear`` before it changes anything; on a GPU, another dtype or a torch without oneDNN it
changes nothing.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

# A layer with at least WIDE_INPUT inputs and LARGE_WEIGHT weights goes through oneDNN at every
# row count; a smaller one (a tiny draft's) only at prefill sizes, from PREFILL_ROWS rows: below,
# oneDNN's per-call cost outweighs what it saves (the bundled 128-wide draft's one-row step: 0.68
# ms with MKL, 0.89 with oneDNN in every layer; its prefill 2.5 against 2.1).
WIDE_INPUT = 256
LARGE_WEIGHT = 1 << 17
PREFILL_ROWS = 16


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDNNLinear(torch.nn.Linear):
    """``nn.Linear`` whose product runs in oneDNN where that is faster (see the module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        large = self.in_features >= WIDE_INPUT and self.weight.numel() >= LARGE_WEIGHT
        if large or x.numel() >= PREFILL_ROWS * self.in_features:
            return _onednn(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this torch has oneDNN's linear and it computes what ``F.linear`` does."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=generator)
    weight, bias = torch.randn(96, 64, generator=generator), torch.randn(96, generator=generator)
    try:
        with torch.inference_mode():
            got = _onednn(x, weight, bias)
    except RuntimeError:
        return False
    return got.shape == (3, 96) and torch.allclose(got, F.linear(x, weight, bias), rtol=1e-4, atol=1e-4)


def use_onednn_linears(model: Any) -> int:
    """Run the float32 ``nn.Linear`` layers of a CPU model through oneDNN; returns how many.

    Idempotent, and it keeps every parameter (tied weights stay tied), hook and ``isinstance``
    check as they were: only the layers' class changes."""
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        return 0
    if not onednn_linear_available():
        return 0
    changed = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = OneDNNLinear
            changed += 1
    return changed
