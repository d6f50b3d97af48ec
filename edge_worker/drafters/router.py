"""router: picks one of edge.drafts per session from the prompt, re-picks from observed tokens/s."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.logs import get_logger
from edge_worker.drafters.prompt_lookup import load_lookup
from edge_worker.drafters.registry import DraftContext, Drafter, register

if TYPE_CHECKING:
    from edge_worker.backends.base import DraftBackend

log = get_logger("specd.edge")


def build(ctx: DraftContext) -> DraftBackend:
    """Reads edge.drafts (each entry built by its own drafter) and prompt lookup's settings."""
    from edge_worker.backends.router import build_router, default_drafts

    drafts = [d.model_dump() for d in ctx.settings.edge.drafts] or default_drafts()
    backend = build_router(drafts, ctx.model, ctx.load,
                           lambda model, beside: load_lookup(ctx, model, beside))
    log.info("edge.backend_ready", backend="router", device=backend.device, model=backend.model_name)
    return backend


register(Drafter("router", "picks one of edge.drafts per session from the prompt, re-picks from "
                 "observed tokens/s", build, routable=False))
