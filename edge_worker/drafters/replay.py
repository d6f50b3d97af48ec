"""replay: no model, proposes a precomputed target continuation (load tests)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_worker.drafters.registry import DraftContext, Drafter, register

if TYPE_CHECKING:
    from edge_worker.backends.base import DraftBackend


def build(ctx: DraftContext) -> DraftBackend:
    """Reads edge.replay_file, edge.replay_acceptance, models.trust_remote_code (the tokenizer)."""
    from edge_worker.backends.replay import ReplayDraftBackend

    edge = ctx.settings.edge
    return ReplayDraftBackend.from_files(edge.replay_file, ctx.model, edge.replay_acceptance,
                                         ctx.settings.models.trust_remote_code)


register(Drafter("replay", "no model, no device: replays a precomputed target continuation "
                 "(edge.replay_file; load tests)", build, routable=False))
