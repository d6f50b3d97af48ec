"""Which devices each draft backend can use here, and how a requested device is resolved.

The settings speak one vocabulary for every backend (``auto``, ``cpu``, ``cuda[:N]``, ``gpu[.N]``,
``npu``); each backend has its own names (torch ``cuda:0``, OpenVINO ``GPU.0``, GenAI providers).
A missing device either falls back to the backend's CPU or fails, as ``edge.device_fallback``
says; the device actually chosen is what the backend reports and what gets logged.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from common.logs import get_logger

log = get_logger("specd.edge.devices")

INSTALL_HINTS = {
    "openvino": "pip install 'specd[openvino]'",
    "genai": "pip install 'specd[genai]'",
}
_MODULES = {"torch": "torch", "openvino": "openvino", "genai": "onnxruntime_genai"}


class BackendUnavailableError(Exception):
    """The backend's package is not installed; the message carries the install hint."""


class DeviceUnavailableError(Exception):
    """The requested device is missing and ``edge.device_fallback`` is ``fail``."""


def require(backend: str) -> None:
    """Raise ``BackendUnavailableError`` (with the pip command) when the package is missing."""
    if not installed(backend):
        raise BackendUnavailableError(
            f"the {backend} draft backend needs the {_MODULES[backend]} package: {INSTALL_HINTS[backend]}")


def installed(backend: str) -> bool:
    return importlib.util.find_spec(_MODULES[backend]) is not None


def torch_devices() -> list[str]:
    import torch

    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def openvino_devices() -> list[str]:
    import openvino as ov

    return list(ov.Core().available_devices)


ORT_PROVIDERS = {"CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml",
                 "QNNExecutionProvider": "qnn", "WebGpuExecutionProvider": "webgpu"}


def genai_devices() -> list[str]:
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


LISTERS = {"torch": torch_devices, "openvino": openvino_devices, "genai": genai_devices}
DRAFTERS = {
    "prompt_lookup": "no model, no device: proposes what followed the latest n-gram match in the context "
                     "(edge.lookup_with_model: models.draft when nothing matches)",
    "router": "picks one of edge.drafts per session from the prompt, re-picks from observed tokens/s",
}
"""Drafters that need no device of their own (their model drafts use edge.device)."""


def available_devices(backend: str) -> list[str]:
    require(backend)
    return LISTERS[backend]()


def candidates(backend: str, requested: str) -> list[str]:
    """Backend-native names that satisfy ``requested``, best first (``auto``: accelerators first)."""
    kind, _, index = requested.replace(":", ".").partition(".")
    if backend == "torch":
        table = {"cpu": ["cpu"], "cuda": [f"cuda:{index or 0}"], "gpu": [f"cuda:{index or 0}", "mps"],
                 "npu": [], "auto": ["cuda:0", "mps", "cpu"]}
    elif backend == "openvino":
        gpu = [f"GPU.{index}"] if index else ["GPU", "GPU.0"]
        table = {"cpu": ["CPU"], "gpu": gpu, "cuda": [], "npu": ["NPU"], "auto": ["GPU", "GPU.0", "CPU"]}
    else:
        table = {"cpu": ["cpu"], "cuda": ["cuda"], "gpu": ["cuda", "dml", "webgpu"], "npu": ["qnn"],
                 "auto": ["cuda", "dml", "cpu"]}
    return table[kind]


CPU_NAME = {"torch": "cpu", "openvino": "CPU", "genai": "cpu"}


@dataclass(frozen=True)
class DeviceChoice:
    requested: str
    used: str  # the backend-native device actually used
    fell_back: bool = False
    available: list[str] = field(default_factory=list)


def resolve_device(backend: str, requested: str, fallback: str = "fallback",
                   available: list[str] | None = None) -> DeviceChoice:
    """Map ``requested`` to a device this backend has; fall back to CPU or fail as configured.

    ``available`` defaults to what the machine offers (tests inject it).
    """
    have = available_devices(backend) if available is None else available
    for name in candidates(backend, requested):
        if name in have:
            return DeviceChoice(requested, name, False, have)
    if requested == "auto" or fallback == "fallback":
        cpu = CPU_NAME[backend]
        if requested != "auto":
            log.warning("edge.device_fallback", backend=backend, requested=requested, used=cpu,
                        available=have)
        return DeviceChoice(requested, cpu, requested != "auto", have)
    raise DeviceUnavailableError(
        f"edge.device={requested!r} is not available to the {backend} backend on this machine "
        f"(available: {', '.join(have) or 'none'}); set edge.device_fallback = \"fallback\" to use "
        f"the CPU instead")


def describe_all() -> dict[str, dict[str, object]]:
    """What ``specd devices`` prints: per backend, installed or not, its devices, auto's pick."""
    report: dict[str, dict[str, object]] = {}
    for backend in LISTERS:
        if not installed(backend):
            report[backend] = {"installed": False, "devices": [], "hint": INSTALL_HINTS[backend]}
            continue
        try:
            have = available_devices(backend)
        except Exception as exc:  # noqa: BLE001 - report a broken install rather than crash
            report[backend] = {"installed": True, "devices": [], "error": str(exc)}
            continue
        report[backend] = {"installed": True, "devices": have,
                           "auto": resolve_device(backend, "auto", available=have).used}
    for name, note in DRAFTERS.items():
        report[name] = {"installed": True, "devices": [], "drafter": note}
    return report
