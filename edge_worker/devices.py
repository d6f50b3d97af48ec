"""Which devices each draft backend can use here, and how a requested device is resolved.

The settings speak one vocabulary for every backend (``auto``, ``cpu``, ``cuda[:N]``, ``gpu[.N]``,
``npu``); each backend has its own names (torch ``cuda:0``, OpenVINO ``GPU.0``, GenAI providers),
which its drafter spec declares (``edge_worker.drafters``). A missing device either falls back to
the backend's CPU or fails, as ``edge.device_fallback`` says; the device actually chosen is what
the backend reports and what gets logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common.logs import get_logger

if TYPE_CHECKING:
    from edge_worker.drafters.registry import Drafter

log = get_logger("specd.edge.devices")


class BackendUnavailableError(Exception):
    """The backend's package is not installed; the message carries the install hint."""


class DeviceUnavailableError(Exception):
    """The requested device is missing and ``edge.device_fallback`` is ``fail``."""


def _drafter(backend: str) -> Drafter:
    from edge_worker import drafters  # the registry's modules import this one

    return drafters.get(backend)


def require(backend: str) -> None:
    """Raise ``BackendUnavailableError`` (with the pip command) when the package is missing."""
    drafter = _drafter(backend)
    if not installed(backend):
        raise BackendUnavailableError(
            f"the {backend} draft backend needs the {drafter.package} package: {drafter.install_hint}")


def installed(backend: str) -> bool:
    return bool(_drafter(backend).installed)


def available_devices(backend: str) -> list[str]:
    require(backend)
    lister = _drafter(backend).devices
    return lister() if lister is not None else []


def candidates(backend: str, requested: str) -> list[str]:
    """Backend-native names that satisfy ``requested``, best first (``auto``: accelerators first)."""
    kind, _, index = requested.replace(":", ".").partition(".")
    names = _drafter(backend).candidates
    return names(kind, index) if names is not None else []


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
        cpu = _drafter(backend).cpu
        if requested != "auto":
            log.warning("edge.device_fallback", backend=backend, requested=requested, used=cpu,
                        available=have)
        return DeviceChoice(requested, cpu, requested != "auto", have)
    raise DeviceUnavailableError(
        f"edge.device={requested!r} is not available to the {backend} backend on this machine "
        f"(available: {', '.join(have) or 'none'}); set edge.device_fallback = \"fallback\" to use "
        f"the CPU instead")


def describe_all() -> dict[str, dict[str, object]]:
    """What ``specd devices`` prints: per drafter, installed or not, its devices, auto's pick."""
    from edge_worker import drafters

    report: dict[str, dict[str, object]] = {}
    for name, drafter in drafters.REGISTRY.items():
        if not installed(name):
            report[name] = {"installed": False, "devices": [], "hint": drafter.install_hint}
        elif drafter.devices is None:
            report[name] = {"installed": True, "devices": [], "drafter": drafter.summary}
        else:
            report[name] = _listed(name)
    return report


def _listed(backend: str) -> dict[str, object]:
    try:
        have = available_devices(backend)
    except Exception as exc:  # noqa: BLE001 - report a broken install rather than crash
        return {"installed": True, "devices": [], "error": str(exc)}
    return {"installed": True, "devices": have, "auto": resolve_device(backend, "auto", available=have).used}
