"""openvino: the draft model converted to OpenVINO IR, on its CPU, GPU or NPU."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_worker.drafters.registry import DraftContext, Drafter, register

if TYPE_CHECKING:
    from edge_worker.backends.base import DraftBackend


def devices() -> list[str]:
    import openvino as ov

    return list(ov.Core().available_devices)


def candidates(kind: str, index: str) -> list[str]:
    gpu = [f"GPU.{index}"] if index else ["GPU", "GPU.0"]
    table = {"cpu": ["CPU"], "gpu": gpu, "cuda": [], "npu": ["NPU"], "auto": ["GPU", "GPU.0", "CPU"]}
    return table[kind]


def build(ctx: DraftContext) -> DraftBackend:
    """Reads models.trust_remote_code, models.torch_threads, edge.device, edge.precision, edge.cache_dir."""
    from edge_worker.backends.openvino_backend import OpenVINODraftBackend
    from edge_worker.drafters.placement import place, ready

    placement, models = place(ctx, "openvino"), ctx.settings.models
    backend = OpenVINODraftBackend(ctx.model, placement.device.used, placement.precision, placement.cache_dir,
                                   models.trust_remote_code, models.torch_threads)
    return ready("openvino", backend, ctx, placement)


register(Drafter("openvino", "the draft model in OpenVINO (CPU, GPU, NPU)", build, package="openvino",
                 install_hint="pip install 'specd[openvino]'", devices=devices, candidates=candidates,
                 cpu="CPU"))
