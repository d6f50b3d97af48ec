"""Draft backends behind one interface, built by ``create_backend``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.logs import get_logger
from edge_worker.backends.base import DraftBackend, DraftState, Proposal
from edge_worker.devices import DRAFTERS, resolve_device

BACKENDS = ("torch", "openvino", "genai", "replay", "prompt_lookup", "router")
DTYPE_PRECISION = {"float32": "f32", "float64": "f32", "float16": "f16", "bfloat16": "bf16"}
PRECISION_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}

log = get_logger("specd.edge")


def resolve_precision(precision: str, dtype: str) -> str:
    """``auto`` follows the torch dtype setting (float64 -> f32); anything else is kept."""
    return DTYPE_PRECISION[dtype] if precision == "auto" else precision


def create_backend(kind: str, model: str, dtype: str = "float32", device: str = "cpu", *,
                   fallback: str = "fallback", precision: str = "auto", cache_dir: str = "",
                   trust_remote_code: bool = False, threads: int = 0, replay_file: str = "",
                   replay_acceptance: float = 0.8, lookup_ngram: tuple[int, int] = (1, 3),
                   lookup_with_model: bool = False,
                   drafts: list[dict[str, Any]] | None = None) -> DraftBackend:
    """Load ``model`` into the named backend on ``device`` (see ``edge_worker.devices``).

    ``replay`` loads no model: only ``model``'s tokenizer and the replay file (load tests).
    ``prompt_lookup`` loads only the tokenizer (and ``model`` under torch with
    ``lookup_with_model``); ``router`` builds every entry of ``drafts`` (see router.py).
    """
    if kind not in BACKENDS:
        raise ValueError(f"unknown draft backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    if kind == "replay":
        from edge_worker.backends.replay import ReplayDraftBackend

        return ReplayDraftBackend.from_files(replay_file, model, replay_acceptance, trust_remote_code)
    if kind in ("prompt_lookup", "router"):
        def load_model(backend: str, name: str) -> DraftBackend:
            return create_backend(backend, name, dtype, device, fallback=fallback, precision=precision,
                                  cache_dir=cache_dir, trust_remote_code=trust_remote_code, threads=threads)

        return _model_free(kind, model, load_model, trust_remote_code, lookup_ngram, lookup_with_model,
                           drafts)
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
        backend = TorchDraftBackend(load_causal_lm(model, torch_dtype, choice.used, trust_remote_code,
                                                   cache_dir=cache_dir))
    elif kind == "openvino":
        from edge_worker.backends.openvino_backend import OpenVINODraftBackend

        backend = OpenVINODraftBackend(model, choice.used, chosen, folder, trust_remote_code, threads)
    else:
        from edge_worker.backends.genai_backend import GenAIDraftBackend

        backend = GenAIDraftBackend(model, choice.used, chosen, folder, trust_remote_code)
    log.info("edge.backend_ready", backend=kind, requested_device=device, device=backend.device,
             fell_back=choice.fell_back, precision=chosen, model=model)
    return backend


def _model_free(kind: str, model: str, load_model: Any, trust_remote_code: bool,
                lookup_ngram: tuple[int, int], with_model: bool,
                drafts: list[dict[str, Any]] | None) -> DraftBackend:
    """Prompt lookup (alone or beside a model draft) or the router over several drafters."""
    from edge_worker.backends.prompt_lookup import PromptLookupBackend

    options = {"min_ngram": lookup_ngram[0], "max_ngram": lookup_ngram[1]}

    def load_lookup(name: str, beside: DraftBackend | None) -> DraftBackend:
        if beside is not None:
            return PromptLookupBackend.beside(beside, **options)
        return PromptLookupBackend.from_tokenizer(name, trust_remote_code, **options)

    if kind == "prompt_lookup":
        backend = load_lookup(model, load_model("torch", model) if with_model else None)
    else:
        from edge_worker.backends.router import build_router, default_drafts

        backend = build_router(drafts or default_drafts(), model, load_model, load_lookup)
    log.info("edge.backend_ready", backend=kind, device=backend.device, model=backend.model_name)
    return backend


__all__ = ["BACKENDS", "DRAFTERS", "DraftBackend", "DraftState", "Proposal", "create_backend",
           "resolve_precision"]
