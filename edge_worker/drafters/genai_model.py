"""genai: the draft model in ONNX Runtime GenAI, on the execution providers installed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_worker.drafters.registry import DraftContext, Drafter, register

if TYPE_CHECKING:
    from edge_worker.backends.base import DraftBackend

ORT_PROVIDERS = {"CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml",
                 "QNNExecutionProvider": "qnn", "WebGpuExecutionProvider": "webgpu"}


def devices() -> list[str]:
    """ONNX Runtime GenAI execution providers usable here (``cpu`` always).

    Read from onnxruntime's own provider list: onnxruntime-genai's ``is_*_available`` probes
    answer True for providers its build merely knows of (``qnn`` and ``webgpu`` on a CPU-only
    Linux wheel, where creating a model with them then fails).
    """
    import onnxruntime_genai  # noqa: F401 - the backend's own package must be importable

    try:
        import onnxruntime as ort
    except ImportError:
        return ["cpu"]
    return ["cpu"] + [name for provider, name in ORT_PROVIDERS.items()
                      if provider in ort.get_available_providers()]


def candidates(kind: str, index: str) -> list[str]:
    table = {"cpu": ["cpu"], "cuda": ["cuda"], "gpu": ["cuda", "dml", "webgpu"], "npu": ["qnn"],
             "auto": ["cuda", "dml", "cpu"]}
    return table[kind]


def build(ctx: DraftContext) -> DraftBackend:
    """Reads models.trust_remote_code, edge.device, edge.precision, edge.cache_dir."""
    from edge_worker.backends.genai_backend import GenAIDraftBackend
    from edge_worker.drafters.placement import place, ready

    placement = place(ctx, "genai")
    backend = GenAIDraftBackend(ctx.model, placement.device.used, placement.precision, placement.cache_dir,
                                ctx.settings.models.trust_remote_code)
    return ready("genai", backend, ctx, placement)


register(Drafter("genai", "the draft model in ONNX Runtime GenAI", build, package="onnxruntime_genai",
                 install_hint="pip install 'specd[genai]'", devices=devices, candidates=candidates))
