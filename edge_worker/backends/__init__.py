"""Draft backends behind one interface, built by ``create_backend``."""

from __future__ import annotations

from pathlib import Path

from common.logs import get_logger
from edge_worker.backends.base import DraftBackend, DraftState, Proposal
from edge_worker.devices import resolve_device

BACKENDS = ("torch", "openvino", "genai", "replay")
DTYPE_PRECISION = {"float32": "f32", "float64": "f32", "float16": "f16", "bfloat16": "bf16"}
PRECISION_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}

log = get_logger("specd.edge")


def resolve_precision(precision: str, dtype: str) -> str:
    """``auto`` follows the torch dtype setting (float64 -> f32); anything else is kept."""
    return DTYPE_PRECISION[dtype] if precision == "auto" else precision


def create_backend(kind: str, model: str, dtype: str = "float32", device: str = "cpu", *,
                   fallback: str = "fallback", precision: str = "auto", cache_dir: str = "",
                   trust_remote_code: bool = False, threads: int = 0, replay_file: str = "",
                   replay_acceptance: float = 0.8) -> DraftBackend:
    """Load ``model`` into the named backend on ``device`` (see ``edge_worker.devices``).

    ``replay`` loads no model: only ``model``'s tokenizer and the replay file (load tests).
    """
    if kind not in BACKENDS:
        raise ValueError(f"unknown draft backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    if kind == "replay":
        from edge_worker.backends.replay import ReplayDraftBackend

        return ReplayDraftBackend.from_files(replay_file, model, replay_acceptance, trust_remote_code)
    choice = resolve_device(kind, device, fallback)
    chosen = resolve_precision(precision, dtype)
    folder = Path(cache_dir).expanduser() if cache_dir else None
    backend: DraftBackend
    if kind == "torch":
        if chosen not in PRECISION_DTYPE:
            raise ValueError(f"the torch backend supports precision f32, f16, bf16, not {chosen!r}")
        from common.models import load_causal_lm
        from edge_worker.backends.torch_backend import TorchDraftBackend

        torch_dtype = dtype if precision == "auto" else PRECISION_DTYPE[chosen]
        backend = TorchDraftBackend(load_causal_lm(model, torch_dtype, choice.used, trust_remote_code))
    elif kind == "openvino":
        from edge_worker.backends.openvino_backend import OpenVINODraftBackend

        backend = OpenVINODraftBackend(model, choice.used, chosen, folder, trust_remote_code, threads)
    else:
        from edge_worker.backends.genai_backend import GenAIDraftBackend

        backend = GenAIDraftBackend(model, choice.used, chosen, folder, trust_remote_code)
    log.info("edge.backend_ready", backend=kind, requested_device=device, device=backend.device,
             fell_back=choice.fell_back, precision=chosen, model=model)
    return backend


__all__ = ["BACKENDS", "DraftBackend", "DraftState", "Proposal", "create_backend", "resolve_precision"]
