"""Pool behaviour of verifier workers sharing one (fake) Redis: adoption, dead letters, limits.

The tenant-limit tests run the Lua scripts of broker/pool.py in fakeredis, which needs lupa (the
dev extra's ``fakeredis[lua]``); without it they fail with "unknown command 'evalsha'".
"""

from __future__ import annotations

import asyncio
import contextlib

import fakeredis
import numpy as np
import pytest
from honest import HonestBroker

from broker.streams import Broker
from common.models import load_causal_lm
from common.sampling import SamplingParams, apply_stop_rules
from common.settings import Settings
from common.wire import (
    DraftBatch,
    ErrorCode,
    ErrorMessage,
    SamplingSpec,
    SessionClose,
    SessionOpen,
    Verdict,
    decode,
    encode,
)
from verifier_worker.engine import TargetEngine, generate_target_only
from verifier_worker.kv import DEFAULT_BLOCK_TOKENS
from verifier_worker.session import kv_reserve
from verifier_worker.worker import VerifierWorker

PROMPT = "import os"
MAX_NEW = 8


@pytest.fixture(scope="module")
def target(tiny_pair):
    return load_causal_lm(tiny_pair["target"])


@pytest.fixture
def server():
    return fakeredis.FakeServer()


@pytest.fixture
async def make_worker(target, server):
    brokers = []

    async def make(worker_id: str, **sections) -> VerifierWorker:
        broker = HonestBroker(fakeredis.FakeAsyncRedis(server=server), prefix="p")
        brokers.append(broker)
        settings = Settings(verifier={"idle_block_ms": 1}, **sections)
        worker = VerifierWorker(settings, TargetEngine(target.model, target.vocab_size), broker, "tiny",
                                target.fingerprint, worker_id=worker_id)
        await worker.startup()
        return worker

    yield make
    for broker in brokers:
        await broker.close()


def open_payload(sid: str, target, tenant: str = "default", max_new: int = MAX_NEW) -> bytes:
    ids = np.asarray(target.tokenizer.encode(PROMPT), np.uint32)
    return encode(SessionOpen(sid, ids, SamplingSpec(max_new_tokens=max_new), "draft", target.fingerprint,
                              tenant=tenant))


def draft(sid: str, seq: int, start: int, tokens: list[int]) -> bytes:
    empty = np.zeros(0, np.uint32)
    return encode(DraftBatch(sid, seq, start, np.asarray(tokens, np.uint32), np.zeros(0, np.uint16), empty,
                             np.zeros(0, np.float32)))


async def settle(*workers: VerifierWorker, iterations: int = 3) -> None:
    for _ in range(iterations):
        for worker in workers:
            worker.scan_now()  # scan every iteration in these tests
            await worker.iterate()


async def messages(worker: VerifierWorker, sid: str) -> list:
    return [decode(e.payload) for e in await worker.broker.read_verdicts(sid, "0-0", block_ms=1)]


class Edge:
    """A minimal greedy edge: drafts fixed tokens (two by default) and applies verdicts like the client."""

    def __init__(self, sid: str, target) -> None:
        self.sid, self.context = sid, target.tokenizer.encode(PROMPT)
        self.prompt_len, self.seq, self.seen, self.finish = len(self.context), 0, 0, None
        self.drafted = [5, 6]

    async def send(self, broker: Broker, tokens: tuple[int, ...] = (5, 6)) -> None:
        self.drafted = list(tokens)
        await broker.send_draft(self.sid, draft(self.sid, self.seq, len(self.context), self.drafted))

    def apply(self, verdicts: list) -> None:
        for v in verdicts[self.seen:]:
            self.seen += 1
            if isinstance(v, Verdict) and v.seq == self.seq:
                generated = len(self.context) - self.prompt_len
                kept, self.finish = apply_stop_rules([*self.drafted[:v.accepted], v.token], generated,
                                                     frozenset(), MAX_NEW)
                self.context += kept
                assert len(self.context) == v.committed
                self.seq += 1


async def test_lapsed_session_is_adopted_with_its_pending_draft_and_stays_exact(make_worker, target) -> None:
    pool = {"lease_ms": 200}
    w1, w2 = await make_worker("w1", pool=pool), await make_worker("w2", pool=pool)
    await w1.broker.open_session("s", open_payload("s", target))
    await settle(w1)
    assert "s" in w1.sessions and "s" not in w2.sessions
    edge = Edge("s", target)
    await edge.send(w1.broker)
    await settle(w1)
    edge.apply(await messages(w1, "s"))
    assert edge.seq == 1
    # w1 reads the next draft and dies before verifying it: the draft stays pending at w1.
    await edge.send(w1.broker)
    await w1.broker.read_work("w1", [w1.broker.keys.drafts("s")], None)
    await asyncio.sleep(0.25)  # the lease lapses
    await settle(w2)
    assert "s" in w2.sessions and w2.stats.sessions_adopted == 1
    edge.apply(await messages(w2, "s"))
    assert edge.seq == 2
    while edge.finish is None:
        await edge.send(w2.broker)
        await settle(w2)
        edge.apply(await messages(w2, "s"))
    reference = generate_target_only(w2.engine, target.tokenizer.encode(PROMPT), SamplingParams(),
                                     frozenset(), MAX_NEW)
    assert edge.context[edge.prompt_len:] == reference
    # The old owner learns at its next tick that the session is gone and never touches it again.
    await w1.tick()
    assert "s" not in w1.sessions and w1.stats.sessions_lost == 1


async def test_repeatedly_failing_draft_goes_to_the_dead_letters(make_worker, target) -> None:
    pool = {"lease_ms": 200, "max_deliveries": 1}
    w1, w2 = await make_worker("w1", pool=pool), await make_worker("w2", pool=pool)
    await w1.broker.open_session("d", open_payload("d", target))
    await settle(w1)
    await Edge("d", target).send(w1.broker)
    await w1.broker.read_work("w1", [w1.broker.keys.drafts("d")], None)  # w1 dies holding it
    await asyncio.sleep(0.25)
    await settle(w2)
    [error] = await messages(w2, "d")
    assert isinstance(error, ErrorMessage) and error.code is ErrorCode.DEAD_LETTER and error.fatal
    [(_, fields)] = await w2.broker.redis.xrange("p:deadletter")
    assert b"delivered 2 times" in fields[b"error"] and "d" not in w2.sessions


async def test_failing_pass_retries_alone_then_dead_letters(make_worker, target, monkeypatch) -> None:
    w = await make_worker("w", pool={"max_deliveries": 2})
    for sid in ("ok", "poison"):
        await w.broker.open_session(sid, open_payload(sid, target))
    await settle(w, iterations=1)
    real = w.engine.verify

    def verify(requests):
        if any(r.draft.token_ids.tolist() == [7, 7] for r in requests):
            raise RuntimeError("boom")
        return real(requests)

    monkeypatch.setattr(w.engine, "verify", verify)
    start = len(target.tokenizer.encode(PROMPT))
    await w.broker.send_draft("poison", draft("poison", 0, start, [7, 7]))
    await w.broker.send_draft("ok", draft("ok", 0, start, [5, 6]))
    await settle(w, iterations=4)
    [verdict] = await messages(w, "ok")
    [error] = await messages(w, "poison")
    assert isinstance(verdict, Verdict) and error.code is ErrorCode.DEAD_LETTER
    assert await w.broker.redis.xlen("p:deadletter") == 1 and "ok" in w.sessions


async def test_tenant_over_its_session_limit_gets_a_typed_error(make_worker, target) -> None:
    w = await make_worker("w", tenants={"overrides": {"flood": {"max_sessions": 1}}})
    for sid in ("flood.f1", "flood.f2", "other.o1", "other.o2"):
        await w.broker.open_session(sid, open_payload(sid, target, sid.partition(".")[0]))
    await settle(w, iterations=1)
    [error] = await messages(w, "flood.f2")
    assert error.code is ErrorCode.TENANT_LIMIT and error.fatal and "flood" in error.message
    assert set(w.sessions) == {"flood.f1", "other.o1", "other.o2"}
    assert await w.broker.redis.zrange("p:tenant:flood:sessions", 0, -1) == [b"flood.f1"]
    await Edge("other.o2", target).send(w.broker)
    await settle(w)
    [verdict] = await messages(w, "other.o2")
    assert isinstance(verdict, Verdict)
    # A finished session frees its slot at once.
    await w.broker.send_draft("flood.f1", encode(SessionClose("flood.f1", "done")))
    await settle(w, iterations=1)
    assert await w.broker.redis.zcard("p:tenant:flood:sessions") == 0
    await w.broker.open_session("flood.f3", open_payload("flood.f3", target, "flood"))
    await settle(w, iterations=1)
    assert "flood.f3" in w.sessions and await messages(w, "flood.f3") == []


async def test_adopted_session_is_not_refused_by_its_own_tenant_entry(make_worker, target) -> None:
    sections = {"pool": {"lease_ms": 200}, "tenants": {"max_sessions": 1}}
    w1, w2 = await make_worker("w1", **sections), await make_worker("w2", **sections)
    await w1.broker.open_session("s", open_payload("s", target))
    await settle(w1, iterations=1)
    assert "s" in w1.sessions
    await asyncio.sleep(0.25)  # w1 stalls: its lease lapses (its tenant entry lives a lease longer)
    await settle(w2, iterations=1)
    assert "s" in w2.sessions and await messages(w2, "s") == []
    await w2.tick()
    assert await w2.broker.redis.zrange("p:tenant:default:sessions", 0, -1) == [b"s"]
    await w2.broker.open_session("t", open_payload("t", target))  # the tenant is still at its limit
    await settle(w2, iterations=1)
    [error] = await messages(w2, "t")
    assert error.code is ErrorCode.TENANT_LIMIT and "t" not in w2.sessions


async def test_draft_token_bucket_takes_a_prefix_and_says_when_the_next_fits(make_worker) -> None:
    w = await make_worker("w")
    taken, wait_s = await w.pool.take_draft_tokens("t", [4, 4, 4], rate=10.0, capacity=10.0)
    assert taken == 2 and 0.1 < wait_s <= 0.2  # 2 tokens left, the third draft needs 2 more
    assert await w.pool.take_draft_tokens("t", [], rate=10.0, capacity=10.0) == (0, 0.0)
    await asyncio.sleep(wait_s)
    assert (await w.pool.take_draft_tokens("t", [4], rate=10.0, capacity=10.0))[0] == 1
    # A draft larger than the whole bucket passes once the bucket is full, leaving a debt.
    taken, wait_s = await w.pool.take_draft_tokens("big", [15, 1], rate=10.0, capacity=10.0)
    assert taken == 1 and 0.5 < wait_s <= 0.6  # -5 tokens now: 6 more for the next draft


async def test_tenant_over_its_draft_rate_is_delayed_not_dropped(make_worker, target) -> None:
    w = await make_worker("w", tenants={"overrides": {"fast": {"draft_tokens_per_s": 10.0}}})
    for sid, tenant in (("fast.1", "fast"), ("fast.2", "fast"), ("slow.1", "slow")):
        await w.broker.open_session(sid, open_payload(sid, target, tenant))
    await settle(w, iterations=1)
    edges = {sid: Edge(sid, target) for sid in ("fast.1", "fast.2", "slow.1")}
    await edges["fast.1"].send(w.broker, (5, 6, 7, 8, 9, 10, 11, 12))  # 8 of the bucket's 10 tokens
    await settle(w)
    await edges["fast.2"].send(w.broker, (5, 6, 7, 8, 9, 10, 11, 12))  # needs 6 more: held back
    await edges["slow.1"].send(w.broker)
    await settle(w)
    [notice] = await messages(w, "fast.2")
    assert notice.code is ErrorCode.TENANT_LIMIT and not notice.fatal and notice.seq == 0
    assert 0.3 < notice.retry_after_s <= 0.6 and "fast" in notice.message
    assert "fast.2" in w.sessions and w.stats.drafts_throttled == 1
    assert (await w.broker.redis.xpending("p:{fast.2}:drafts", "verifiers"))["pending"] == 1  # not acked
    edges["slow.1"].apply(await messages(w, "slow.1"))
    assert edges["slow.1"].seq == 1  # the other tenant is served meanwhile ...
    await edges["slow.1"].send(w.broker)
    await settle(w)
    edges["slow.1"].apply(await messages(w, "slow.1"))
    assert edges["slow.1"].seq == 2 and await messages(w, "fast.2") == [notice]  # ... and fast2 still waits
    await asyncio.sleep(notice.retry_after_s)
    await settle(w)
    edge = edges["fast.2"]
    edge.apply(await messages(w, "fast.2"))
    assert edge.seq == 1 and w.stats.drafts_throttled == 1  # verified once the bucket had room
    while edge.finish is None:  # the rest of the session, throttled as needed: exact, never ended
        seq = edge.seq
        await edge.send(w.broker)
        for _ in range(100):
            await settle(w, iterations=1)
            edge.apply(await messages(w, "fast.2"))
            if edge.seq > seq:
                break
            await asyncio.sleep(0.02)
        assert edge.seq > seq
    reference = generate_target_only(w.engine, target.tokenizer.encode(PROMPT), SamplingParams(),
                                     frozenset(), MAX_NEW)
    assert edge.context[edge.prompt_len:] == reference
    assert not w.stats.errors


async def test_retried_pass_does_not_take_draft_tokens_twice(make_worker, target, monkeypatch) -> None:
    w = await make_worker("w", tenants={"draft_tokens_per_s": 100.0})
    await w.broker.open_session("r", open_payload("r", target))
    await settle(w, iterations=1)
    charged: list[list[int]] = []
    take, verify = w.pool.take_draft_tokens, w.engine.verify

    async def counting(tenant, costs, rate, capacity):
        charged.append(list(costs))
        return await take(tenant, costs, rate, capacity)

    failures = iter([True])

    def flaky(requests):
        if next(failures, False):
            raise RuntimeError("boom")
        return verify(requests)

    monkeypatch.setattr(w.pool, "take_draft_tokens", counting)
    monkeypatch.setattr(w.engine, "verify", flaky)
    await Edge("r", target).send(w.broker)
    await settle(w)
    [verdict] = await messages(w, "r")
    assert isinstance(verdict, Verdict) and charged == [[2]]  # paid once, verified on the retry


def one_session_budget(target) -> int:
    """A KV budget whose admission share (less the growth headroom) holds one session's blocks,
    not two: sessions are admitted by the blocks they use (paged KV)."""
    need = kv_reserve(len(target.tokenizer.encode(PROMPT)) + MAX_NEW, 0, Settings().limits.max_gamma)
    return -(-need // DEFAULT_BLOCK_TOKENS) * DEFAULT_BLOCK_TOKENS


async def test_admission_control_when_kv_budget_is_full(make_worker, target) -> None:
    budget = one_session_budget(target)
    w = await make_worker("w", pool={"kv_budget_tokens": budget, "admission_wait_s": 30.0})
    await w.broker.open_session("first", open_payload("first", target))
    await settle(w, iterations=1)
    edge = Edge("first", target)
    await edge.send(w.broker)
    await w.broker.open_session("second", open_payload("second", target))
    await settle(w)
    assert set(w.sessions) == {"first"} and await messages(w, "second") == []  # waits in the stream
    edge.apply(await messages(w, "first"))
    assert edge.seq == 1  # the running session is unaffected
    while edge.finish is None:
        await edge.send(w.broker)
        await settle(w)
        edge.apply(await messages(w, "first"))
    await settle(w)
    assert "second" in w.sessions  # admitted once the first session freed its KV
    # With no waiting allowed, an open that does not fit is refused with a typed error.
    w.settings.pool.admission_wait_s = 0.0
    await w.broker.open_session("third", open_payload("third", target))
    await asyncio.sleep(0.01)
    await settle(w)
    [error] = await messages(w, "third")
    assert error.code is ErrorCode.CAPACITY and "KV" in error.message


async def test_idle_session_is_evicted_for_room_and_recomputed_when_it_returns(make_worker, target) -> None:
    w = await make_worker("w", pool={"kv_budget_tokens": one_session_budget(target), "idle_evict_s": 0.0})
    await w.broker.open_session("idle", open_payload("idle", target))
    await settle(w, iterations=1)
    edge = Edge("idle", target)
    await edge.send(w.broker)
    await settle(w)
    edge.apply(await messages(w, "idle"))
    await w.broker.open_session("new", open_payload("new", target))
    await settle(w)
    assert {"idle", "new"} <= set(w.sessions) and w.sessions["idle"].evicted
    assert w.sessions["idle"].kv.length == 0 and w.stats.evictions == 1
    while edge.finish is None:
        await edge.send(w.broker)
        await settle(w)
        edge.apply(await messages(w, "idle"))
    reference = generate_target_only(TargetEngine(target.model, target.vocab_size),
                                     target.tokenizer.encode(PROMPT), SamplingParams(), frozenset(), MAX_NEW)
    assert edge.context[edge.prompt_len:] == reference


async def test_loaded_worker_passes_opens_on_and_leaving_worker_hands_over(make_worker, target) -> None:
    w1, w2 = await make_worker("w1", pool={"spread_slack": 0}), await make_worker("w2")
    await w1.broker.open_session("a", open_payload("a", target))
    await settle(w1, iterations=1)
    w1.state.peers = {"w2": {"sessions": 0}}
    await w1.broker.open_session("b", open_payload("b", target))
    await settle(w1, iterations=1)
    assert set(w1.sessions) == {"a"} and w1.stats.opens_passed_on == 1
    await settle(w2, iterations=1)
    assert "b" in w2.sessions
    # w1 leaves: its lease is released at once and w2 adopts the session without waiting.
    await w1.shutdown()
    await settle(w2, iterations=1)
    assert {"a", "b"} <= set(w2.sessions)


async def test_a_renewal_racing_another_after_a_pause_keeps_the_session(make_worker, target) -> None:
    """Before: after a process pause (the verifier SIGSTOPped for longer than its lease) the tick's
    renewal and a fenced commit's renewal ran at once. One took the lapsed lease again under a new
    epoch; the other found the lease held (by this very worker, under that epoch) and dropped the
    session as lost to another worker. Nobody served it until its lease lapsed again and (its open's
    meta key expired meanwhile) its edge re-sent the open: a session at seq 0 could get no verdict
    within the edge's timeout (tests/integration/test_faults.py, slow verifier, under load)."""
    w = await make_worker("w1")
    await w.broker.open_session("s", open_payload("s", target))
    await settle(w, iterations=1)
    session = w.sessions["s"]
    old = session.lease
    await w.broker.redis.delete(w.broker.keys.lease("s"))  # the lease lapsed while the process was stopped
    real = w.state.pool.renew
    second_done = asyncio.Event()
    calls = 0

    async def renew(worker: str, held: dict[str, str], lease_ms: int) -> dict[str, str | None]:
        nonlocal calls
        calls += 1
        first = calls == 1
        changes = await real(worker, held, lease_ms)
        if first:  # hold the first renewal's reply back while a concurrent one (if any) completes
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(second_done.wait(), 1.0)
        else:
            second_done.set()
        return changes

    w.state.pool.renew = renew
    await asyncio.gather(w.leases.renew(), w.leases.renew([session]))
    assert w.sessions.get("s") is session and session.lease != old  # taken again, still served
    assert w.stats.sessions_lost == 0 and w.stats.leases_retaken == 1
    assert await w.broker.redis.get(w.broker.keys.lease("s")) == session.lease.encode()
