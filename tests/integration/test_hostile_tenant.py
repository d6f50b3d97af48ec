"""Issue 22 (findings 1, 2, 4, 5): a tenant shapes Redis replies with its own ACL rights.

A real redis-server with the ACL users `specd acl` prints (broker.acl): one in-process verifier
(user ``verifier``) serves tenants ``acme`` (the victim) and ``evil`` (the attacker, with only
its edge user's rights). In every test acme's sessions finish exact and the verifier keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest
import redis
from redis.exceptions import ResponseError

from broker.acl import edge_rule, ops_rule, verifier_rule
from broker.streams import FIELD, MAC_FIELD, connect
from common.integrity import mac, session_key
from common.sampling import SamplingParams
from common.settings import Settings
from common.wire import DraftBatch, ErrorMessage, SamplingSpec, SessionOpen, decode, encode
from edge_worker.client import SessionFailed
from specd.runtime import build_edge, build_verifier, make_broker
from verifier_worker.engine import generate_target_only

pytestmark = pytest.mark.integration
PREFIX = "hostile"
PASSWORDS = {"verifier": "v-pw", "edge-acme": "acme-pw", "edge-evil": "evil-pw", "ops": "ops-pw"}
MAX_NEW = 10
TOP_ID = "18446744073709551615-18446744073709551615"  # the largest stream id: nothing can follow it


@pytest.fixture(scope="module")
def acl_redis(redis_url: str) -> Iterator[str]:
    admin = redis.Redis.from_url(redis_url)
    for rule in (
        verifier_rule(PREFIX, PASSWORDS["verifier"]),
        edge_rule(PREFIX, "acme", PASSWORDS["edge-acme"]),
        edge_rule(PREFIX, "evil", PASSWORDS["edge-evil"]),
        ops_rule(PREFIX, PASSWORDS["ops"]),
    ):
        _, name, *rules = rule.split(" ")
        admin.execute_command("ACL", "SETUSER", name, "reset", *rules)
    yield redis_url
    for user in PASSWORDS:
        admin.execute_command("ACL", "DELUSER", user)
    admin.close()


def settings_as(url: str, tiny_pair: dict, user: str, tenant: str = "default", **extra) -> Settings:
    pool = {"scan_interval_ms": 100, "lease_ms": 1000, **extra.pop("pool", {})}
    return Settings(
        redis={"url": url, "key_prefix": PREFIX, "username": user, "password": PASSWORDS[user]},
        models={"target": tiny_pair["target"], "draft": tiny_pair["draft"]},
        verifier={"idle_block_ms": 20, "worker_id": "v-hostile", "acl_check": "strict"},
        edge={"verdict_timeout_s": 20, "tenant": tenant, "worker_id": f"{tenant}-e1", "resend_after_s": 2},
        tenants={"names": ["acme", "evil"]},
        pool=pool,
        **extra,
    )


@contextlib.asynccontextmanager
async def verifier_as(url: str, tiny_pair: dict, **extra) -> AsyncIterator:
    settings = settings_as(url, tiny_pair, "verifier", **extra)
    broker = make_broker(settings)
    verifier = build_verifier(settings, broker)
    stop = asyncio.Event()
    task = asyncio.create_task(verifier.run(stop))
    try:
        yield verifier
        assert not task.done(), f"the verifier exited: {task.exception() if task.done() else ''}"
    finally:
        stop.set()
        await task  # a verifier that died raises here
        await broker.close()


async def run_acme(
    url: str, tiny_pair: dict, verifier, prompts: tuple[str, ...] = ("def add(a, b):", "import os"), **extra
) -> None:
    """acme's sessions finish, token for token the target's greedy output."""
    settings = settings_as(url, tiny_pair, "edge-acme", tenant="acme", **extra)
    broker = make_broker(settings)
    try:
        edge = build_edge(settings, broker)
        tokenizer = edge.backend.tokenizer
        results = await asyncio.gather(
            *(edge.generate(tokenizer.encode(p), SamplingSpec(max_new_tokens=MAX_NEW)) for p in prompts)
        )
        for prompt, result in zip(prompts, results, strict=True):
            assert result.token_ids == generate_target_only(
                verifier.engine, tokenizer.encode(prompt), SamplingParams(), frozenset(), MAX_NEW
            )
    finally:
        await broker.close()


async def evil_generate(url: str, tiny_pair: dict, sid: str, tenant: str = "evil") -> SessionFailed:
    """An evil session through the real edge client: it must fail with a typed error, nothing else."""
    settings = settings_as(url, tiny_pair, "edge-evil", tenant=tenant)
    broker = make_broker(settings)
    try:
        edge = build_edge(settings, broker)
        with pytest.raises(SessionFailed) as failed:
            await edge.generate(
                edge.backend.tokenizer.encode("import os"), SamplingSpec(max_new_tokens=4), session_id=sid
            )
        return failed.value
    finally:
        await broker.close()


def an_open(sid: str, fingerprint: str, tenant: str = "evil") -> bytes:
    return encode(
        SessionOpen(
            sid,
            np.asarray([5, 6, 7], np.uint32),
            SamplingSpec(max_new_tokens=4),
            "draft",
            fingerprint,
            tenant=tenant,
        )
    )


def signed(payload: bytes, sid: str) -> dict[bytes, bytes]:
    """Stream fields as the session's edge writes them: the payload and its MAC (no verdict_secret
    here, so anyone who knows the session id can sign: what is tested is the keys, not integrity)."""
    return {FIELD: payload, MAC_FIELD: mac(session_key("", sid, b""), payload)}


async def state_of(url: str, sid: str) -> dict[bytes, bytes]:
    admin = connect(url, 5)
    try:
        for _ in range(200):
            state = await admin.hgetall(f"{PREFIX}:{{{sid}}}:state")
            if b"finished" in state:
                return state
            await asyncio.sleep(0.05)
        return state
    finally:
        await admin.aclose()


def greedy_draft(sid: str) -> DraftBatch:
    """Round 0 of a session opened by ``an_open`` (three prompt tokens): one greedy draft token."""
    return DraftBatch(
        session_id=sid,
        seq=0,
        start=3,
        token_ids=np.asarray([1], np.uint32),
        support_sizes=np.zeros(0, np.uint16),
        support_ids=np.zeros(0, np.uint32),
        support_probs=np.zeros(0, np.float32),
    )


def evil_client(url: str):
    return connect(url, 5, username="edge-evil", password=PASSWORDS["edge-evil"])


async def test_finding1_wrong_type_session_keys_fail_only_their_session(acl_redis, tiny_pair) -> None:
    """Before: a stream at ``{evil.x}:state`` (or ``:tokens``), then opening ``evil.x``, made the lease
    script raise WRONGTYPE and the verifier exit 70 (and the next one, on adoption)."""
    evil = evil_client(acl_redis)
    admin = connect(acl_redis, 5)
    try:
        for sid, kind in (
            ("evil.st", "state"),
            ("evil.tk", "tokens"),
            ("evil.ls", "lease"),
            ("evil.mt", "meta"),
        ):
            await evil.xadd(f"{PREFIX}:{{{sid}}}:{kind}", {FIELD: b"x" * 100})
        await evil.xadd(f"{PREFIX}:{{evil.vd}}:verdicts", {FIELD: b"x"}, id=TOP_ID)  # verdicts blocked
        # A lapsed session (as Redis holds it after its owner died) whose tokens evil replaced.
        await evil.xadd(f"{PREFIX}:{{evil.ad}}:tokens", {FIELD: b"x"})
        async with verifier_as(acl_redis, tiny_pair) as verifier:
            opened = signed(an_open("evil.ad", verifier.fingerprint), "evil.ad")
            await admin.hset(
                f"{PREFIX}:{{evil.ad}}:meta", mapping={"open": opened[FIELD], "a": opened[MAC_FIELD]}
            )
            await admin.zadd(f"{PREFIX}:leases", {"evil.ad": 0})
            await evil.xadd(
                f"{PREFIX}:opens:{{evil}}", signed(an_open("evil.vd", verifier.fingerprint), "evil.vd")
            )
            planted = ("evil.st", "evil.tk", "evil.ls", "evil.mt")
            failures = await asyncio.gather(
                *(evil_generate(acl_redis, tiny_pair, sid) for sid in planted),
                run_acme(acl_redis, tiny_pair, verifier),
            )
            assert [f.code.value for f in failures[:4]] == ["invalid_state"] * 4
            assert "evil.vd" in verifier.sessions  # its verdicts stream breaks its first commit
            await evil.xadd(
                f"{PREFIX}:{{evil.vd}}:drafts", signed(encode(greedy_draft("evil.vd")), "evil.vd")
            )
            for sid in ("evil.st", "evil.tk", "evil.ls", "evil.mt", "evil.ad", "evil.vd"):
                assert (await state_of(acl_redis, sid)).get(b"finished") == b"invalid_state", sid
            assert await admin.type(f"{PREFIX}:{{evil.ad}}:tokens") == b"none"  # quarantined
            assert verifier.stats.errors.get("invalid_state", 0) >= 6
            await run_acme(acl_redis, tiny_pair, verifier)  # and still serving
    finally:
        await evil.aclose()
        await admin.aclose()


async def test_finding2_a_poisoned_opens_stream_blocks_only_its_tenant(acl_redis, tiny_pair) -> None:
    """Before: a max-id entry in evil's own opens stream made ``pass_on_open`` (XADD * in a MULTI) fail:
    the verifier exited 70 and the XACK+XDEL in the same MULTI lost the open; evil's edge died on an
    untyped ResponseError. Every open here is passed on (a peer that reports fewer sessions)."""
    evil = evil_client(acl_redis)
    admin = connect(acl_redis, 5)
    stop_peer = asyncio.Event()

    async def fake_peer() -> None:  # an idle, accepting peer: every verifier passes opens on to it
        while not stop_peer.is_set():
            await admin.hset(
                f"{PREFIX}:workers",
                "v-peer",
                json.dumps({"sessions": -1, "accepting": True, "at": time.time()}),
            )
            await asyncio.sleep(0.2)

    peer = asyncio.create_task(fake_peer())
    try:
        async with verifier_as(
            acl_redis, tiny_pair, pool={"spread_slack": 0, "max_open_hops": 2}
        ) as verifier:
            await evil.xadd(
                f"{PREFIX}:opens:{{evil}}", signed(an_open("evil.q1", verifier.fingerprint), "evil.q1")
            )
            await evil.xadd(f"{PREFIX}:opens:{{evil}}", {FIELD: b"junk"}, id=TOP_ID)
            with pytest.raises(ResponseError):  # evil's own opens are blocked now ...
                await evil.xadd(f"{PREFIX}:opens:{{evil}}", {FIELD: b"x"})
            failed = await evil_generate(acl_redis, tiny_pair, "evil.q2")  # ... typed at its edge
            assert failed.code.value == "invalid_state"
            with pytest.raises(ResponseError):  # the deferred stream is the verifiers' alone
                await evil.xadd(f"{PREFIX}:deferred:{{evil}}", {FIELD: b"x"}, id=TOP_ID)
            await run_acme(acl_redis, tiny_pair, verifier)
            for _ in range(200):  # evil's honest open was passed on, then taken: not lost
                if "evil.q1" in verifier.sessions:
                    break
                await asyncio.sleep(0.05)
            assert "evil.q1" in verifier.sessions and verifier.stats.opens_passed_on >= 2
    finally:
        stop_peer.set()
        await peer
        await admin.hdel(f"{PREFIX}:workers", "v-peer")
        await admin.delete(f"{PREFIX}:opens:{{evil}}")
        await evil.aclose()
        await admin.aclose()


async def test_finding4_stale_opens_expire_and_the_tenant_queue_is_bounded(acl_redis, tiny_pair) -> None:
    """Before: a tenant's backlog was served FIFO however old (its edges long gone) and its new sessions
    waited behind it. Now opens nobody drafted for are dropped unanswered while their tenant has a
    backlog (or past ``pool.open_grace_s``): the backlog drains fast and a new session of the same
    tenant is served."""
    evil = evil_client(acl_redis)
    try:
        pool = {"open_expiry_s": 5, "max_queued_opens": 20}
        async with verifier_as(acl_redis, tiny_pair, pool=pool) as verifier:
            stale = int(time.time() * 1000) - 60_000
            async with evil.pipeline(transaction=False) as pipe:
                for i in range(100):  # a minute old (ids a tenant may choose), then a fresh flood
                    pipe.xadd(
                        f"{PREFIX}:opens:{{evil}}",
                        signed(an_open(f"evil.old{i}", verifier.fingerprint), f"evil.old{i}"),
                        id=f"{stale}-{i + 1}",
                    )
                for i in range(100):
                    pipe.xadd(
                        f"{PREFIX}:opens:{{evil}}",
                        signed(an_open(f"evil.new{i}", verifier.fingerprint), f"evil.new{i}"),
                    )
                await pipe.execute()
            await run_acme(
                acl_redis,
                tiny_pair,
                verifier,
                prompts=("import os",),
            )
            # A live session of the flooding tenant itself, opened behind its 200 queued opens.
            settings = settings_as(acl_redis, tiny_pair, "edge-evil", tenant="evil")
            broker = make_broker(settings)
            try:
                edge = build_edge(settings, broker)
                prompt = edge.backend.tokenizer.encode("def add(a, b):")
                result = await edge.generate(prompt, SamplingSpec(max_new_tokens=MAX_NEW))
                assert result.token_ids == generate_target_only(
                    verifier.engine, prompt, SamplingParams(), frozenset(), MAX_NEW
                )
            finally:
                await broker.close()
            assert verifier.stats.opens_dropped == 200
            assert verifier.stats.sessions_opened == 2  # acme's and evil's live sessions: none of the 200
            assert not any(sid.startswith(("evil.old", "evil.new")) for sid in verifier.sessions)
    finally:
        admin = connect(acl_redis, 5)
        await admin.delete(f"{PREFIX}:opens:{{evil}}")
        await admin.aclose()
        await evil.aclose()


async def test_finding4_a_tenant_flooding_its_own_opens_still_serves_its_live_sessions(
    acl_redis, tiny_pair
) -> None:
    """Before: opens were served FIFO per tenant: 3,000 idle opens (no edge behind them) queued on a
    tenant's own stream were each admitted, one at a time, ahead of that tenant's live sessions (0 of
    16 live sessions finished during such a burst: benchmarks/results/hostile_selfflood.json). Now
    edges draft first and opens without a draft stream are dropped while the tenant has a backlog:
    the tenant's live sessions, opened behind the burst while its flood goes on, finish exact, no
    idle open is ever taken, acme is served and the verifier keeps running."""
    evil = evil_client(acl_redis)
    stop = asyncio.Event()
    flooded = 0

    async def burst(n: int, tag: str, fingerprint: str) -> None:
        nonlocal flooded
        async with evil.pipeline(transaction=False) as pipe:
            for i in range(n):
                sid = f"evil.idle{tag}-{i}"
                pipe.xadd(f"{PREFIX}:opens:{{evil}}", signed(an_open(sid, fingerprint), sid))
            await pipe.execute()
        flooded += n

    async def flood(fingerprint: str) -> None:  # the flood goes on while the live sessions run
        rounds = 0
        while not stop.is_set():
            await burst(50, f"f{rounds}", fingerprint)
            rounds += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)

    try:
        async with verifier_as(acl_redis, tiny_pair, pool={"open_grace_s": 120}) as verifier:
            await burst(3000, "b", verifier.fingerprint)
            flooding = asyncio.create_task(flood(verifier.fingerprint))
            settings = settings_as(acl_redis, tiny_pair, "edge-evil", tenant="evil")
            broker = make_broker(settings)
            prompts = ("def add(a, b):", "import os", "class Stack:")
            try:
                edge = build_edge(settings, broker)
                tokenizer = edge.backend.tokenizer
                spec = SamplingSpec(max_new_tokens=MAX_NEW)
                results = await asyncio.gather(*(edge.generate(tokenizer.encode(p), spec) for p in prompts))
                for prompt, result in zip(prompts, results, strict=True):
                    assert result.token_ids == generate_target_only(
                        verifier.engine, tokenizer.encode(prompt), SamplingParams(), frozenset(), MAX_NEW)
                await run_acme(acl_redis, tiny_pair, verifier)
            finally:
                stop.set()
                await flooding
                await broker.close()
            assert verifier.stats.opens_dropped > 0
            assert verifier.stats.sessions_opened == len(prompts) + 2  # evil's live ones, acme's: no idle one
            assert not any(sid.startswith("evil.idle") for sid in verifier.sessions)
            assert flooded > 3000
    finally:
        admin = connect(acl_redis, 5)
        await admin.delete(f"{PREFIX}:opens:{{evil}}")
        await admin.aclose()
        await evil.aclose()


async def test_finding5_acl_refusal_and_foreign_drafts_are_typed(acl_redis, tiny_pair) -> None:
    """Before: an ACL refusal reached the edge as an untyped error ("internal error", exit 70), and a
    draft naming another session id on a session's stream was verified as that session's."""
    refused = await evil_generate(acl_redis, tiny_pair, "acme.steal", tenant="acme")  # edge-evil as acme
    assert refused.code.value == "forbidden"
    evil = evil_client(acl_redis)
    admin = connect(acl_redis, 5)
    try:
        async with verifier_as(acl_redis, tiny_pair) as verifier:
            await evil.xadd(
                f"{PREFIX}:opens:{{evil}}", signed(an_open("evil.d1", verifier.fingerprint), "evil.d1")
            )
            for _ in range(200):
                if "evil.d1" in verifier.sessions:
                    break
                await asyncio.sleep(0.05)
            await evil.xadd(
                f"{PREFIX}:{{evil.d1}}:drafts", signed(encode(greedy_draft("evil.other")), "evil.d1")
            )
            errors = []
            for _ in range(200):
                reply = await evil.xread({f"{PREFIX}:{{evil.d1}}:verdicts": "0-0"})
                errors = [decode(f[FIELD]) for _, f in (reply[0][1] if reply else [])]
                if errors:
                    break
                await asyncio.sleep(0.05)
            assert errors and isinstance(errors[0], ErrorMessage) and "evil.other" in errors[0].message
            assert verifier.stats.rounds == 0  # nothing verified for it
            await run_acme(acl_redis, tiny_pair, verifier, prompts=("import os",))
    finally:
        await evil.aclose()
        await admin.aclose()


async def test_finding5_a_session_back_from_a_snapshot_is_ended_and_untimed_keys_get_a_ttl(
    acl_redis, tiny_pair
) -> None:
    """Before: sessions that had finished came back from an RDB snapshot (state, meta and lease
    registry as of the snapshot) and held KV and tenant slots for the 600 s session TTL; a tenant's
    own-pattern streams and ghost drafts streams lived with no TTL."""
    evil = evil_client(acl_redis)
    admin = connect(acl_redis, 5)
    try:
        await evil.xadd(f"{PREFIX}:{{evil.parked}}:junk", {FIELD: b"x" * 10_000})
        await admin.xadd(f"{PREFIX}:{{ghost}}:drafts", {FIELD: b"x"})  # anyone's, without ACLs
        pool = {"adopted_idle_s": 1, "janitor_interval_s": 0.2}
        async with verifier_as(acl_redis, tiny_pair, pool=pool) as verifier:
            sid = "acme.back"
            opened = signed(an_open(sid, verifier.fingerprint, "acme"), sid)
            await admin.hset(
                f"{PREFIX}:{{{sid}}}:meta", mapping={"open": opened[FIELD], "a": opened[MAC_FIELD]}
            )
            await admin.hset(f"{PREFIX}:{{{sid}}}:state", mapping={"next_seq": 1, "epoch": 1})
            await admin.set(f"{PREFIX}:{{{sid}}}:tokens", np.asarray([5, 6, 7, 8], "<u4").tobytes())
            await admin.zadd(f"{PREFIX}:leases", {sid: 0})
            assert (await state_of(acl_redis, sid)).get(b"finished") == b"expired"
            assert sid not in verifier.sessions
            for _ in range(100):
                ttls = [
                    await admin.ttl(key)
                    for key in (f"{PREFIX}:{{evil.parked}}:junk", f"{PREFIX}:{{ghost}}:drafts")
                ]
                if all(t > 0 for t in ttls):
                    break
                await asyncio.sleep(0.05)
            assert all(0 < t <= verifier.broker.ttl for t in ttls)
            await run_acme(acl_redis, tiny_pair, verifier, prompts=("import os",))
    finally:
        await evil.aclose()
        await admin.aclose()
