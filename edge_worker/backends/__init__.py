"""Draft backends behind one interface, built by ``create_backend``."""

from __future__ import annotations

from edge_worker.backends.base import DraftBackend, DraftState, Proposal

BACKENDS = ("torch",)


def create_backend(kind: str, model: str, dtype: str = "float32", device: str = "cpu",
                   trust_remote_code: bool = False) -> DraftBackend:
    """Load ``model`` into the named backend."""
    if kind == "torch":
        from common.models import load_causal_lm
        from edge_worker.backends.torch_backend import TorchDraftBackend

        return TorchDraftBackend(load_causal_lm(model, dtype, device, trust_remote_code))
    raise ValueError(f"unknown draft backend {kind!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "DraftBackend", "DraftState", "Proposal", "create_backend"]
