"""The drafter registry: each drafter declares itself once, as one ``Drafter`` spec.

A spec says what ``create_backend``, ``specd devices`` and the settings need to know of a
drafter: its name, one line for ``specd devices``, the package it needs and how to install it,
how it lists and names its devices (none: it has no device of its own), whether the router may
pick it, and how it builds itself from the settings (``build``: it reads there whatever settings
it uses). Nothing else in the code base is keyed by a drafter's name.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common import settings as settings_module
from common.settings import Settings

if TYPE_CHECKING:
    from edge_worker.backends.base import DraftBackend


@dataclass(frozen=True)
class DraftContext:
    """What a drafter's factory is given."""

    settings: Settings
    model: str  # the model it drafts with: models.draft, or its router entry's model
    load: Callable[[str, str], DraftBackend]  # build another drafter (name, model): composites


@dataclass(frozen=True)
class Drafter:
    name: str
    summary: str  # one line for ``specd devices``
    build: Callable[[DraftContext], DraftBackend]
    package: str = ""  # the importable package it needs ("" none)
    install_hint: str = ""  # the pip command that installs it
    devices: Callable[[], list[str]] | None = None  # its native device names here; None: no device
    candidates: Callable[[str, str], list[str]] | None = None  # (kind, index): native names, best first
    cpu: str = "cpu"  # its native name of the CPU, the fallback device
    routable: bool = True  # may be an entry of edge.drafts

    @property
    def installed(self) -> bool:
        return not self.package or importlib.util.find_spec(self.package) is not None


REGISTRY: dict[str, Drafter] = {}


def register(drafter: Drafter) -> Drafter:
    """Make ``drafter`` known to create_backend, ``specd devices`` and the settings' checks."""
    REGISTRY[drafter.name] = drafter
    settings_module.DRAFTERS[drafter.name] = drafter.routable
    return drafter


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)
    settings_module.DRAFTERS.pop(name, None)


def get(name: str) -> Drafter:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown draft backend {name!r}; choose one of {', '.join(REGISTRY)}") from None
