"""Draft backends behind one interface, built by ``create_backend`` from the drafter registry."""

from __future__ import annotations

from typing import Any

from common.settings import EdgeSettings, Settings
from edge_worker import drafters
from edge_worker.backends.base import DraftBackend, DraftState, Proposal
from edge_worker.drafters.placement import DTYPE_PRECISION, PRECISION_DTYPE, resolve_precision


def build_drafter(settings: Settings, name: str = "", model: str = "") -> DraftBackend:
    """The drafter ``name`` (default: edge.backend) drafting with ``model`` (default: models.draft)."""
    drafter = drafters.get(name or settings.edge.backend)

    def load(other: str, other_model: str) -> DraftBackend:
        return build_drafter(settings, other, other_model)

    return drafter.build(drafters.DraftContext(settings, model or settings.models.draft, load))


def create_backend(kind: str, model: str, settings: Settings | None = None, **edge: Any) -> DraftBackend:
    """Load ``model`` into the drafter ``kind``, with ``edge`` overriding edge.* settings.

    ``replay`` loads no model: only ``model``'s tokenizer and the replay file (load tests);
    ``prompt_lookup`` only the tokenizer (and ``model`` under torch with ``lookup_with_model``);
    ``router`` builds every entry of ``drafts`` (see router.py).
    """
    base = settings or Settings()
    if edge:
        edge_settings = EdgeSettings.model_validate({**base.edge.model_dump(), **edge})
        base = base.model_copy(update={"edge": edge_settings})
    return build_drafter(base, kind, model)


BACKENDS = tuple(drafters.REGISTRY)

__all__ = ["BACKENDS", "DTYPE_PRECISION", "PRECISION_DTYPE", "DraftBackend", "DraftState", "Proposal",
           "build_drafter", "create_backend", "resolve_precision"]
