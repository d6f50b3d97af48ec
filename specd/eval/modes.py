"""The three ways a question is generated: target-only, draft-only and speculative (the pipeline).

Target-only and draft-only run the local models in a worker thread, the same code paths as
``specd generate --mode target|draft``; speculative runs an edge session through Redis against the
verifier pool (the embedded one or ``--redis-url``'s). Each returns a ``Generate``: context ids in,
a ``TurnOutput`` out, timed around the generation alone.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from common.sampling import SamplingParams, apply_stop_rules
from common.wire import SamplingSpec
from edge_worker.client import EdgeClient
from specd.eval.conversation import Generate, TurnOutput
from verifier_worker.engine import TargetEngine, generate_target_only

SPEC_STATS = ("rounds", "drafted", "accepted", "target_forward_passes", "draft_ms", "queue_ms",
              "verify_ms", "transport_ms", "first_token_ms")


def _params(spec: SamplingSpec) -> SamplingParams:
    return SamplingParams.of(spec)


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def target_generate(engine: TargetEngine, spec: SamplingSpec) -> Generate:
    stops = frozenset(spec.stop_token_ids)

    def work(ids: list[int]) -> TurnOutput:
        passes, started = engine.forward_passes, time.perf_counter()
        tokens = generate_target_only(engine, ids, _params(spec), stops, spec.max_new_tokens)
        return TurnOutput(tokens, _elapsed_ms(started),
                          {"target_forward_passes": engine.forward_passes - passes})

    async def generate(ids: list[int]) -> TurnOutput:
        return await asyncio.to_thread(work, ids)

    return generate


def draft_generate(backend: Any, spec: SamplingSpec, max_support: int) -> Generate:
    """The draft model alone, one token per step (as ``specd generate --mode draft``)."""
    stops = frozenset(spec.stop_token_ids)

    def work(ids: list[int]) -> TurnOutput:
        state, context, tokens = backend.new_state(), list(ids), list[int]()
        started = time.perf_counter()
        try:
            for seq in range(spec.max_new_tokens):
                proposal = backend.propose(state, context, 1, _params(spec), seq, stops, max_support)
                kept, finish = apply_stop_rules(proposal.token_ids, len(tokens), stops,
                                                spec.max_new_tokens)
                tokens.extend(kept)
                context.extend(kept)
                if finish:
                    break
        finally:
            backend.release(state)
        return TurnOutput(tokens, _elapsed_ms(started), {"target_forward_passes": 0})

    async def generate(ids: list[int]) -> TurnOutput:
        return await asyncio.to_thread(work, ids)

    return generate


def speculative_generate(client: EdgeClient, spec: SamplingSpec) -> Generate:
    """One edge session per turn; its wall time starts once the session has a slot."""

    async def generate(ids: list[int]) -> TurnOutput:
        result = await client.generate(ids, spec)
        summary = result.summary()
        return TurnOutput(list(result.token_ids), float(result.wall_ms),
                          {key: float(summary[key]) for key in SPEC_STATS})

    return generate
