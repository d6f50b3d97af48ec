"""torch: the draft model in PyTorch (transformers), on cpu, cuda[:N] or mps."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_worker.drafters.registry import DraftContext, Drafter, register

if TYPE_CHECKING:
    from edge_worker.backends.base import DraftBackend


def devices() -> list[str]:
    import torch

    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def candidates(kind: str, index: str) -> list[str]:
    table = {"cpu": ["cpu"], "cuda": [f"cuda:{index or 0}"], "gpu": [f"cuda:{index or 0}", "mps"],
             "npu": [], "auto": ["cuda:0", "mps", "cpu"]}
    return table[kind]


def build(ctx: DraftContext) -> DraftBackend:
    """Reads models.dtype, models.trust_remote_code, edge.device, edge.precision, edge.cache_dir."""
    from common.feature_draft import feature_draft_folder
    from common.models import load_causal_lm
    from edge_worker.backends.torch_backend import TorchDraftBackend
    from edge_worker.drafters.placement import PRECISION_DTYPE, place, ready

    if feature_draft_folder(ctx.model) is not None:  # drafts from the target's features
        return ctx.load("feature", ctx.model)
    placement = place(ctx, "torch")
    if placement.precision not in PRECISION_DTYPE:
        raise ValueError(f"the torch backend supports precision f32, f16, bf16, not {placement.precision!r}")
    models = ctx.settings.models
    dtype = models.dtype if ctx.settings.edge.precision == "auto" else PRECISION_DTYPE[placement.precision]
    model = load_causal_lm(ctx.model, dtype, placement.device.used, models.trust_remote_code,
                           cache_dir=ctx.settings.edge.cache_dir)
    return ready("torch", TorchDraftBackend(model), ctx, placement)


register(Drafter("torch", "the draft model in PyTorch", build, package="torch", devices=devices,
                 candidates=candidates))
