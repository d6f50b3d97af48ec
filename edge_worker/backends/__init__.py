"""Draft backends behind one interface, built by ``create_backend``."""

from __future__ import annotations

from edge_worker.backends.base import DraftBackend, DraftState, Proposal

BACKENDS = ("torch", "replay")


def create_backend(kind: str, model: str, dtype: str = "float32", device: str = "cpu",
                   trust_remote_code: bool = False, replay_file: str = "",
                   replay_acceptance: float = 0.8) -> DraftBackend:
    """Load ``model`` into the named backend (replay: only its tokenizer, plus the replay file)."""
    if kind == "torch":
        from common.models import load_causal_lm
        from edge_worker.backends.torch_backend import TorchDraftBackend

        return TorchDraftBackend(load_causal_lm(model, dtype, device, trust_remote_code))
    if kind == "replay":
        from edge_worker.backends.replay import ReplayDraftBackend

        return ReplayDraftBackend.from_files(replay_file, model, replay_acceptance, trust_remote_code)
    raise ValueError(f"unknown draft backend {kind!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "DraftBackend", "DraftState", "Proposal", "create_backend"]
