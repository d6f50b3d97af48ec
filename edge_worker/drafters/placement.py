"""Where and at what precision a model drafter runs: shared by the drafters that load a model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.logs import get_logger
from edge_worker.devices import DeviceChoice, resolve_device
from edge_worker.drafters.registry import DraftContext

if TYPE_CHECKING:
    from edge_worker.backends.base import DraftBackend

DTYPE_PRECISION = {"float32": "f32", "float64": "f32", "float16": "f16", "bfloat16": "bf16"}
PRECISION_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}

log = get_logger("specd.edge")


def resolve_precision(precision: str, dtype: str) -> str:
    """``auto`` follows the torch dtype setting (float64 -> f32); anything else is kept."""
    return DTYPE_PRECISION[dtype] if precision == "auto" else precision


@dataclass(frozen=True)
class Placement:
    device: DeviceChoice
    precision: str  # f32, f16, bf16, int8, int4
    cache_dir: Path | None  # where converted models are kept; None: the backend's default


def place(ctx: DraftContext, drafter: str) -> Placement:
    """The device (edge.device, edge.device_fallback), precision and cache folder of a drafter."""
    edge, models = ctx.settings.edge, ctx.settings.models
    choice = resolve_device(drafter, edge.device, edge.device_fallback)
    folder = Path(edge.cache_dir).expanduser() if edge.cache_dir else None
    return Placement(choice, resolve_precision(edge.precision, models.dtype), folder)


def ready(drafter: str, backend: DraftBackend, ctx: DraftContext, placement: Placement) -> DraftBackend:
    log.info("edge.backend_ready", backend=drafter, requested_device=ctx.settings.edge.device,
             device=backend.device, fell_back=placement.device.fell_back, precision=placement.precision,
             model=ctx.model)
    return backend
