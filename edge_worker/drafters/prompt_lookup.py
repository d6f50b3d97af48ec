"""prompt_lookup: no model, proposes what followed the latest n-gram match in the context."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.logs import get_logger
from edge_worker.drafters.registry import DraftContext, Drafter, register

if TYPE_CHECKING:
    from edge_worker.backends.base import DraftBackend

log = get_logger("specd.edge")


def load_lookup(ctx: DraftContext, model: str, beside: DraftBackend | None) -> DraftBackend:
    """Prompt lookup on ``model``'s tokenizer, or beside a model drafter (drafting on no match)."""
    from edge_worker.backends.prompt_lookup import PromptLookupBackend

    edge = ctx.settings.edge
    options = {"min_ngram": edge.lookup_min_ngram, "max_ngram": edge.lookup_max_ngram}
    if beside is not None:
        return PromptLookupBackend.beside(beside, **options)
    return PromptLookupBackend.from_tokenizer(model, ctx.settings.models.trust_remote_code, **options)


def build(ctx: DraftContext) -> DraftBackend:
    """Reads edge.lookup_min_ngram, edge.lookup_max_ngram, edge.lookup_with_model."""
    beside = ctx.load("torch", ctx.model) if ctx.settings.edge.lookup_with_model else None
    backend = load_lookup(ctx, ctx.model, beside)
    log.info("edge.backend_ready", backend="prompt_lookup", device=backend.device, model=backend.model_name)
    return backend


register(Drafter("prompt_lookup", "no model, no device: proposes what followed the latest n-gram match "
                 "in the context (edge.lookup_with_model: models.draft when nothing matches)", build))
