"""Tenant limits on a real redis-server: the draft-token rate throttles, max_sessions is exact.

Three verifiers and the edges run in this process (specd.runtime wiring, as tests/local_pool.py),
all on one real Redis, so the limits' Lua scripts run on the server they run on in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
from honest import draft_tag, signed_open

from broker.streams import Broker
from common.sampling import SamplingParams
from common.settings import Settings
from common.wire import ErrorCode, ErrorMessage, SamplingSpec, SessionClose, SessionOpen, decode, encode
from edge_worker.client import EdgeClient, SessionResult
from specd.runtime import build_edge, build_verifier, make_broker
from verifier_worker.engine import generate_target_only
from verifier_worker.worker import VerifierWorker

pytestmark = pytest.mark.integration

PROMPTS = ["def add(a, b):", "import os", "class Stack:", "for i in range(10):"]
RATE = 12.0  # tenant a's draft tokens per second, pool-wide
GAMMA = 4
MAX_NEW = 24


def settings_for(redis_url: str, tiny_pair: dict, prefix: str, tenant: str, **tenants) -> Settings:
    return Settings(redis={"url": redis_url, "key_prefix": prefix},
                    models={"target": tiny_pair["target"], "draft": tiny_pair["draft"]},
                    verifier={"idle_block_ms": 20, "drain_timeout_s": 0},
                    edge={"tenant": tenant, "gamma": GAMMA, "verdict_timeout_s": 30}, tenants=tenants)


async def run_tenant(edge: EdgeClient, verifier: VerifierWorker) -> tuple[list[SessionResult], float]:
    """Every prompt as one greedy session at once; checks exactness; returns results and wall time."""
    tokenizer = edge.backend.tokenizer
    started = time.perf_counter()
    results = await asyncio.gather(*(edge.generate(tokenizer.encode(p), SamplingSpec(max_new_tokens=MAX_NEW))
                                     for p in PROMPTS))
    wall = time.perf_counter() - started
    for prompt, result in zip(PROMPTS, results, strict=True):
        reference = generate_target_only(verifier.engine, tokenizer.encode(prompt), SamplingParams(),
                                         frozenset(), MAX_NEW)
        assert result.token_ids == reference, (edge.config.tenant, prompt)
    return results, wall


@contextlib.asynccontextmanager
async def three_workers(settings: Settings) -> AsyncIterator[list[VerifierWorker]]:
    brokers = [make_broker(settings) for _ in range(3)]
    workers = [build_verifier(settings, broker, worker_id=f"v-{i}") for i, broker in enumerate(brokers)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(worker.run(stop)) for worker in workers]
    try:
        yield workers
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for broker in brokers:
            await broker.close()


async def test_tenant_over_its_draft_rate_is_throttled_exactly_and_the_other_is_unaffected(
        redis_url, tiny_pair) -> None:
    limited = settings_for(redis_url, tiny_pair, "rl", "a", overrides={"a": {"draft_tokens_per_s": RATE}})
    async with three_workers(limited) as workers:  # one bucket for the tenant across the pool
        a_broker, b_broker = make_broker(limited), make_broker(limited)
        edge_a = build_edge(limited, a_broker)
        edge_b = build_edge(settings_for(redis_url, tiny_pair, "rl", "b"), b_broker)
        try:
            (a_results, a_wall), (b_results, b_wall) = await asyncio.gather(
                run_tenant(edge_a, workers[0]), run_tenant(edge_b, workers[0]))
        finally:
            await a_broker.close()
            await b_broker.close()
    drafted = sum(r.drafted for r in a_results)
    rate = drafted / a_wall
    one_batch = len(PROMPTS) * GAMMA
    owners = {w.worker_id: w.stats.drafts_throttled for w in workers}
    print(f"\ntenant a: {drafted} draft tokens in {a_wall:.2f} s = {rate:.1f}/s (limit {RATE:g}/s), "
          f"{sum(r.throttled for r in a_results)} notices (by worker {owners}), mean gamma "
          f"{drafted / sum(r.rounds for r in a_results):.2f}; tenant b: "
          f"{sum(r.drafted for r in b_results)} draft tokens in {b_wall:.2f} s, "
          f"{sum(r.throttled for r in b_results)} notices")
    assert all(r.finish_reason == "length" for r in a_results + b_results)  # nobody was ended
    assert sum(r.throttled for r in a_results) > 0 and sum(owners.values()) > 0
    assert rate <= 1.5 * RATE + one_batch / a_wall  # the pool-wide bucket bounds tenant a ...
    assert rate >= 0.5 * RATE  # ... which still gets about its rate, not a stall
    assert sum(r.throttled for r in b_results) == 0 and b_wall < a_wall
    assert all(ErrorCode.TENANT_LIMIT.value not in w.stats.errors for w in workers)


async def opens_at_once(broker: Broker, worker: VerifierWorker, sids: list[str], tenant: str) -> None:
    """All opens in one pipeline: the workers blocked on the stream wake and race for them."""
    ids = np.asarray([1, 2, 3], np.uint32)
    async with broker.redis.pipeline(transaction=False) as pipe:
        for sid in sids:
            message = SessionOpen(sid, ids, SamplingSpec(max_new_tokens=8), "draft", worker.fingerprint,
                                  tenant=tenant)
            pipe.xadd(broker.keys.opens(tenant), signed_open(encode(message)))
        await pipe.execute()


async def decided(broker: Broker, workers: list[VerifierWorker], sids: list[str],
                  timeout_s: float = 60.0) -> tuple[set[str], dict[str, ErrorMessage]]:
    """Wait until every open is held by a worker or refused; (admitted, refusals)."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = {sid for worker in workers for sid in worker.sessions}
        refused = {}
        for sid in set(sids) - held:
            for entry in await broker.read_verdicts(sid, "0-0", block_ms=1):
                message = decode(entry.payload or b"")
                if isinstance(message, ErrorMessage):
                    refused[sid] = message
        if len(held & set(sids)) + len(refused) == len(sids) or time.monotonic() > deadline:
            return held & set(sids), refused
        await asyncio.sleep(0.05)


async def test_session_limit_is_exact_when_opens_race_on_three_workers(redis_url, tiny_pair) -> None:
    settings = settings_for(redis_url, tiny_pair, "sl", "b", overrides={"a": {"max_sessions": 4}})
    async with three_workers(settings) as workers:
        broker = make_broker(settings)
        edge_b = build_edge(settings, broker)
        try:
            await asyncio.sleep(0.3)  # every worker is blocked on the sessions stream
            sids = [f"a.{i}" for i in range(12)]
            b_run = asyncio.create_task(run_tenant(edge_b, workers[0]))
            await opens_at_once(broker, workers[0], sids, "a")
            admitted, refused = await decided(broker, workers, sids)
            spread = {w.worker_id: len([s for s in w.sessions if s in admitted]) for w in workers}
            print(f"\n12 opens at once, limit 4, 3 workers: admitted {len(admitted)} {spread}, "
                  f"refused {len(refused)}")
            assert len(admitted) == 4 and len(refused) == 8
            assert all(e.code is ErrorCode.TENANT_LIMIT and e.fatal and "limit is 4" in e.message
                       for e in refused.values())
            assert await broker.redis.zcard("sl:tenant:a:sessions") == 4
            b_results, _ = await b_run  # the other tenant: every session finished, exact
            assert all(r.finish_reason == "length" for r in b_results)
            # Closed sessions leave the tenant's set at once, and a new open is admitted.
            for sid in admitted:
                close = encode(SessionClose(sid, "done"))
                await broker.send_draft(sid, close, draft_tag(sid, close))  # as its edge would
            for _ in range(200):
                if not await broker.redis.zcard("sl:tenant:a:sessions"):
                    break
                await asyncio.sleep(0.05)
            assert await broker.redis.zcard("sl:tenant:a:sessions") == 0
            await opens_at_once(broker, workers[0], ["a.again"], "a")
            again, refused_again = await decided(broker, workers, ["a.again"])
            assert again == {"a.again"} and not refused_again
        finally:
            await broker.close()
