"""Findings 1, 2 and 6 of issue 12 against a real redis-server with real ACL users (ACL SETUSER).

The users are exactly the rules `specd acl` prints (broker.acl). One in-process verifier (user
``verifier``, ``acl_check = strict``) serves tenants ``acme`` (the victim) and ``evil`` (the
attacker, at most one session).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
from honest import signed_open
from redis.exceptions import NoPermissionError, ResponseError

from broker.acl import edge_rule, ops_rule, verifier_rule
from broker.streams import FIELD, connect
from common.sampling import SamplingParams
from common.settings import Settings
from common.wire import ErrorCode, ErrorMessage, SamplingSpec, SessionOpen, decode, encode
from specd.runtime import build_edge, build_verifier, make_broker
from verifier_worker.aclcheck import AclTooWide, check_acl
from verifier_worker.engine import generate_target_only

pytestmark = pytest.mark.integration
PREFIX = "iso"
PASSWORDS = {"verifier": "v-pw", "edge-acme": "acme-pw", "edge-evil": "evil-pw", "ops": "ops-pw"}
MAX_NEW = 10


def acl_setuser(admin: redis.Redis, rule: str) -> None:
    """Apply one ACL-file line (``user NAME rules...``) with ACL SETUSER."""
    _, name, *rules = rule.split(" ")
    admin.execute_command("ACL", "SETUSER", name, "reset", *rules)


@pytest.fixture(scope="module")
def acl_redis(redis_url: str) -> Iterator[str]:
    admin = redis.Redis.from_url(redis_url)
    for rule in (
        verifier_rule(PREFIX, PASSWORDS["verifier"]),
        edge_rule(PREFIX, "acme", PASSWORDS["edge-acme"]),
        edge_rule(PREFIX, "evil", PASSWORDS["edge-evil"]),
        ops_rule(PREFIX, PASSWORDS["ops"]),
    ):
        acl_setuser(admin, rule)
    yield redis_url
    for user in PASSWORDS:
        admin.execute_command("ACL", "DELUSER", user)
    admin.close()


def settings_as(url: str, tiny_pair: dict, user: str, tenant: str = "default", **extra) -> Settings:
    return Settings(
        redis={"url": url, "key_prefix": PREFIX, "username": user, "password": PASSWORDS[user]},
        models={"target": tiny_pair["target"], "draft": tiny_pair["draft"]},
        verifier={"idle_block_ms": 20, "worker_id": "v-iso", "acl_check": "strict"},
        edge={"verdict_timeout_s": 20, "tenant": tenant, "worker_id": f"{tenant}-e1"},
        tenants={
            "names": ["acme", "evil"],
            "overrides": {"evil": {"max_sessions": 1}, "acme": {"max_sessions": 2}},
        },
        **extra,
    )


@contextlib.asynccontextmanager
async def verifier_as(url: str, tiny_pair: dict) -> AsyncIterator:
    settings = settings_as(url, tiny_pair, "verifier")
    broker = make_broker(settings)
    verifier = build_verifier(settings, broker)
    stop = asyncio.Event()
    task = asyncio.create_task(verifier.run(stop))
    try:
        yield verifier
    finally:
        stop.set()
        await task
        await broker.close()


async def run_acme(url: str, tiny_pair: dict, verifier) -> None:
    """Two acme sessions at its limit: both finish, token for token the target's greedy output."""
    settings = settings_as(url, tiny_pair, "edge-acme", tenant="acme")
    broker = make_broker(settings)
    try:
        edge = build_edge(settings, broker)
        tokenizer = edge.backend.tokenizer
        prompts = ["def add(a, b):", "import os"]
        results = await asyncio.gather(
            *(edge.generate(tokenizer.encode(p), SamplingSpec(max_new_tokens=MAX_NEW)) for p in prompts)
        )
        for prompt, result in zip(prompts, results, strict=True):
            assert result.session_id.startswith("acme.") and result.forged == 0
            assert result.token_ids == generate_target_only(
                verifier.engine, tokenizer.encode(prompt), SamplingParams(), frozenset(), MAX_NEW
            )
    finally:
        await broker.close()


def an_open(sid: str, tenant: str, fingerprint: str) -> bytes:
    return encode(
        SessionOpen(
            sid,
            np.asarray([5, 6, 7], np.uint32),
            SamplingSpec(max_new_tokens=4),
            "draft",
            fingerprint,
            tenant=tenant,
            nonce=b"k" * 32,
        )
    )


async def test_finding1_a_tenant_cannot_break_the_shared_streams(acl_redis, tiny_pair) -> None:
    """Before: any edge could XADD the max id (or MAXLEN 0) on the shared sessions and logs streams."""
    evil = connect(acl_redis, 5, username="edge-evil", password=PASSWORDS["edge-evil"])
    try:
        with pytest.raises(NoPermissionError):  # another tenant's open stream
            await evil.xadd(
                f"{PREFIX}:opens:{{acme}}", {FIELD: b"x"}, id="18446744073709551615-18446744073709551615"
            )
        with pytest.raises(NoPermissionError):
            await evil.xadd(f"{PREFIX}:opens:{{acme}}", {FIELD: b"x"}, maxlen=0)
        with pytest.raises(NoPermissionError):  # the log stream: verifiers write it, edges do not
            await evil.xadd(f"{PREFIX}:logs", {b"j": b"x" * 1000})
        with pytest.raises(NoPermissionError):  # other tenants' prompts: opens are write-only
            await evil.xrange(f"{PREFIX}:opens:{{evil}}")
        with pytest.raises(NoPermissionError):  # no key of another type under a session's name
            await evil.set(f"{PREFIX}:{{evil.1}}:lease", b"mine")
        with pytest.raises(NoPermissionError):
            await evil.xadd(f"{PREFIX}:{{acme.1}}:drafts", {FIELD: b"x"})
        # What it can do breaks only its own stream: the exhausted id makes its own opens fail.
        await evil.xadd(
            f"{PREFIX}:opens:{{evil}}", {FIELD: b"x"}, id="18446744073709551615-18446744073709551615"
        )
        with pytest.raises(ResponseError):
            await evil.xadd(f"{PREFIX}:opens:{{evil}}", {FIELD: b"x"})
        async with verifier_as(acl_redis, tiny_pair) as verifier:
            await run_acme(acl_redis, tiny_pair, verifier)  # the victim's sessions run, exact
            assert verifier.stats.errors.get("malformed", 0) <= 1  # evil's junk open, refused
    finally:
        await evil.aclose()
        admin = connect(acl_redis, 5)
        await admin.delete(f"{PREFIX}:opens:{{evil}}")
        await admin.aclose()


async def test_finding2_the_tenant_comes_from_the_stream_not_the_message(acl_redis, tiny_pair) -> None:
    """Before: opens claiming tenant acme were counted as acme's (blocking it) and escaped evil's limit."""
    async with verifier_as(acl_redis, tiny_pair) as verifier:
        evil = connect(acl_redis, 5, username="edge-evil", password=PASSWORDS["edge-evil"])
        stream = f"{PREFIX}:opens:{{evil}}"
        try:
            for i in range(4):  # claiming acme's name on its own stream: refused, never counted
                await evil.xadd(stream, signed_open(an_open(f"evil.claim{i}", "acme", verifier.fingerprint)))
            for i in range(4):  # acme's id space on evil's stream: dropped unanswered
                await evil.xadd(stream, signed_open(an_open(f"acme.fake{i}", "acme", verifier.fingerprint)))
            for i in range(4):  # honest opens over its limit of 1: one admitted, three refused
                await evil.xadd(stream, signed_open(an_open(f"evil.s{i}", "evil", verifier.fingerprint)))
            refusals = await wait_for_refusals(
                evil, [f"evil.claim{i}" for i in range(4)] + [f"evil.s{i}" for i in range(4)], expected=7
            )
            assert sorted(m.code.value for m in refusals.values()).count("tenant_limit") == 3
            assert all(refusals[f"evil.claim{i}"].code is ErrorCode.MALFORMED for i in range(4))
            assert not any(sid.startswith("acme.fake") for sid in verifier.sessions)
            assert await verifier.broker.redis.zrange(f"{PREFIX}:tenant:acme:sessions", 0, -1) == []
            await run_acme(acl_redis, tiny_pair, verifier)  # acme's limit of 2 is all acme's
        finally:
            await evil.aclose()


async def wait_for_refusals(
    client: aioredis.Redis, sids: list[str], expected: int
) -> dict[str, ErrorMessage]:
    found: dict[str, ErrorMessage] = {}
    for _ in range(200):
        for sid in sids:
            for _, fields in (await client.xread({f"{PREFIX}:{{{sid}}}:verdicts": "0-0"}) or [[None, []]])[0][
                1
            ]:
                message = decode(fields[FIELD])
                if isinstance(message, ErrorMessage):
                    found[sid] = message
        if len(found) >= expected:
            return found
        await asyncio.sleep(0.05)
    return found


async def test_verifier_acl_check_accepts_its_rule_and_refuses_a_wide_user(acl_redis, tiny_pair) -> None:
    narrow = make_broker(settings_as(acl_redis, tiny_pair, "verifier"))
    wide = make_broker(Settings(redis={"url": acl_redis, "key_prefix": PREFIX}))  # the open default user
    try:
        assert await check_acl(narrow, "strict") == []
        with pytest.raises(AclTooWide, match="wider than it needs"):
            await check_acl(wide, "strict")
        assert len(await check_acl(wide, "warn")) == 2
    finally:
        await narrow.close()
        await wide.close()


async def test_finding6_forged_verdicts_are_rejected_by_the_edge(redis_url, tiny_pair) -> None:
    """Before: without ACLs anyone could XADD verdicts to a session's stream; the edge took them (exit 0).

    Here a forger with the open default user writes wrong verdicts for every seq, as fast as it
    can, into the stream of a session it found by SCAN; the edge drops every one (no MAC of the
    session's key) and the session finishes exact.
    """
    settings = Settings(
        redis={"url": redis_url, "key_prefix": "forge", "verdict_secret": "s3cret"},
        models={"target": tiny_pair["target"], "draft": tiny_pair["draft"]},
        verifier={"idle_block_ms": 20},
        edge={"verdict_timeout_s": 20},
    )
    verifier_broker, edge_broker, forger = make_broker(settings), make_broker(settings), connect(redis_url, 5)
    verifier = build_verifier(settings, verifier_broker, worker_id="v-forge")
    stop, forging = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(verifier.run(stop))

    async def forge() -> int:
        from common.wire import Verdict

        sent = 0
        while not forging.is_set():
            async for key in forger.scan_iter(match="forge:{*}:meta"):
                sid = key.decode().split("{")[1].split("}")[0]
                for seq in range(8):
                    await forger.xadd(
                        f"forge:{{{sid}}}:verdicts", {FIELD: encode(Verdict(sid, seq, 0, 1, 99))}
                    )
                    sent += 1
            await asyncio.sleep(0.005)
        return sent

    forger_task = asyncio.create_task(forge())
    try:
        edge = build_edge(settings, edge_broker)
        prompt = edge.backend.tokenizer.encode("def add(a, b):")
        result = await edge.generate(prompt, SamplingSpec(max_new_tokens=24))
        forging.set()
        sent = await forger_task
        assert sent > 0 and result.forged > 0
        assert result.token_ids == generate_target_only(
            verifier.engine, prompt, SamplingParams(), frozenset(), 24
        )
    finally:
        forging.set()
        stop.set()
        await task
        for broker in (verifier_broker, edge_broker):
            await broker.close()
        await forger.aclose()
