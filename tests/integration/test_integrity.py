"""Output integrity against clients that can write to Redis (issue 22, finding 3), on real Redis.

Before: with the default settings the MAC key of a session sat in its open and in
``{sid}:meta``, so anyone who could read Redis forged verdicts with a valid MAC (63 of 64 tokens
replaced, the edge exited 0); with ``verdict_secret`` set, an injected next draft (seq N+1 at the
committed length) was verified and the edge applied ``accepted`` to its own tokens (50 of 64
wrong, no error).

Here an attacker strikes in every round, just before the honest edge's draft reaches Redis (a
hook in the edge's broker, so that every attempt lands ahead of the round's verdict whatever the
timing): it XADDs a forged verdict for the round and an injected draft for the same seq at the
committed length, each with a MAC under every key it can build from what it can read. Each
session's output must equal target-only greedy, the edge must report every forged verdict
(``forged``) and the verifier's notice of the forged drafts (``forged_drafts``), and the verifier
must refuse every injected draft unverified.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from broker.acl import edge_rule, verifier_rule
from broker.streams import FIELD, MAC_FIELD, Broker, Keys, connect
from common.integrity import ContextDigest, draft_digest, mac, session_key, u32
from common.sampling import SamplingParams
from common.settings import Settings
from common.wire import DraftBatch, SamplingSpec, SessionOpen, Verdict, WireError, decode, encode
from specd.generation import local_verifier, redis_url_for
from specd.runtime import build_edge, make_broker, open_broker
from verifier_worker.engine import generate_target_only

pytestmark = pytest.mark.integration

PROMPTS = ["def add(a, b):", "import os"]
MAX_NEW = 16
WRONG = 3  # the token the attacker wants in every output


@dataclass
class Attacker:
    """Forges one verdict and injects one draft per key guess, before each honest draft lands."""

    client: aioredis.Redis
    keys: Keys
    can_read: bool  # without ACLs everything is readable: the open, its nonce, the prompt
    verdicts_sent: int = 0
    drafts_sent: int = 0
    sessions: set[str] = field(default_factory=set)

    async def guesses(self, sid: str) -> list[bytes]:
        """Every key it can build: the old scheme's (the open's key field), no secret, a random one."""
        found = [session_key("", sid, b""), os.urandom(32)]
        if self.can_read:
            raw = await self.client.hget(self.keys.meta(sid), "open")  # type: ignore[misc]
            opened = decode(raw) if raw else None
            if isinstance(opened, SessionOpen):
                found += [opened.nonce, session_key("", sid, opened.nonce)]
        return found

    async def strike(self, sid: str, honest: DraftBatch) -> None:
        self.sessions.add(sid)
        gamma = max(1, honest.gamma)
        bad = np.full(gamma, WRONG, np.uint32)
        for key in await self.guesses(sid):
            verdict = encode(Verdict(  # "all your drafts but the first are wrong; take WRONG"
                sid, honest.seq, 0, WRONG, honest.start + 1,
                drafted=draft_digest(honest.start, u32(honest.token_ids)),
                context_digest=ContextDigest(os.urandom(8)).digest()))
            await self.client.xadd(self.keys.verdicts(sid), {FIELD: verdict, MAC_FIELD: mac(key, verdict)})
            self.verdicts_sent += 1
            injected = encode(DraftBatch(sid, honest.seq, honest.start, bad, np.zeros(0, np.uint16),
                                         np.zeros(0, np.uint32), np.zeros(0, np.float32)))
            await self.client.xadd(self.keys.drafts(sid), {FIELD: injected, MAC_FIELD: mac(key, injected)})
            self.drafts_sent += 1


class AttackedBroker(Broker):
    """The honest edge's broker: the attacker strikes just before each of its drafts is sent."""

    def __init__(self, inner: Broker, attacker: Attacker) -> None:
        super().__init__(inner.redis, inner.keys.prefix, inner.maxlen, inner.ttl)
        self.attacker = attacker

    async def send_draft(self, sid: str, payload: bytes, tag: bytes | None = None) -> str:
        try:
            message = decode(payload)
        except WireError:
            message = None
        if isinstance(message, DraftBatch):
            await self.attacker.strike(sid, message)
        return await super().send_draft(sid, payload, tag)


async def run_attacked(settings: Settings, edge_broker: Broker, attacker: Attacker, verifier: Any) -> None:
    """Two sessions under attack: exact outputs, every attempt reported, every injected draft refused."""
    edge = build_edge(settings, AttackedBroker(edge_broker, attacker))
    tokenizer = edge.backend.tokenizer
    results = await asyncio.gather(*(edge.generate(tokenizer.encode(p), SamplingSpec(max_new_tokens=MAX_NEW))
                                     for p in PROMPTS))
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.token_ids == generate_target_only(
            verifier.engine, tokenizer.encode(prompt), SamplingParams(), frozenset(), MAX_NEW)
        assert result.rounds >= 2 and result.forged_drafts >= 1
    # Every forged verdict lay ahead of its round's verdict: the edge read and dropped each one.
    assert sum(r.forged for r in results) == attacker.verdicts_sent > 0
    assert verifier.stats.forged_drafts == attacker.drafts_sent > 0
    assert verifier.stats.errors.get("integrity") == attacker.drafts_sent
    assert attacker.sessions == {r.session_id for r in results}


async def test_finding3a_default_embedded_settings_forgeries_change_no_token(tiny_pair) -> None:
    """The default (no redis.url: embedded Redis, no secret configured, no ACLs): the attacker has
    the embedded Redis' password, so it reads everything, the opens and meta included."""
    settings = Settings(models={"target": tiny_pair["target"], "draft": tiny_pair["draft"]},
                        verifier={"idle_block_ms": 20}, edge={"verdict_timeout_s": 30})
    assert settings.redis.url == "" and settings.redis.verdict_secret == ""
    async with redis_url_for(settings) as (url, embedded), contextlib.AsyncExitStack() as stack:
        assert embedded and len(settings.redis.verdict_secret) >= 32  # a fresh secret for this run
        verifier = await stack.enter_async_context(local_verifier(settings, url))
        edge_broker = await open_broker(settings, url)
        stack.push_async_callback(edge_broker.close)
        attacker = Attacker(connect(url, 5), Keys(settings.redis.key_prefix), can_read=True)
        stack.push_async_callback(attacker.client.aclose)
        await run_attacked(settings, edge_broker, attacker, verifier)


@contextlib.asynccontextmanager
async def pool(settings: Settings, verifier_settings: Settings | None = None,
               ) -> AsyncIterator[tuple[Any, Broker]]:
    """A verifier task (with ``verifier_settings``, else ``settings``) and an edge broker."""
    served = verifier_settings or settings
    async with local_verifier(served, served.redis.url) as verifier:
        edge_broker = make_broker(settings)
        try:
            yield verifier, edge_broker
        finally:
            await edge_broker.close()


async def test_finding3b_with_a_secret_injected_drafts_change_no_token(redis_url, tiny_pair) -> None:
    """A shared Redis with no ACLs and a secret configured: the attacker reads and writes every key."""
    settings = Settings(redis={"url": redis_url, "key_prefix": "integ-b", "verdict_secret": "s" * 32},
                        models={"target": tiny_pair["target"], "draft": tiny_pair["draft"]},
                        verifier={"idle_block_ms": 20}, edge={"verdict_timeout_s": 30})
    async with pool(settings) as (verifier, edge_broker):
        attacker = Attacker(connect(redis_url, 5), Keys("integ-b"), can_read=True)
        try:
            await run_attacked(settings, edge_broker, attacker, verifier)
        finally:
            await attacker.client.aclose()


ACL_PREFIX = "integ-c"
PASSWORDS = {"verifier": "v-pw", "edge-acme": "acme-pw"}


@pytest.fixture(scope="module")
def acl_users(redis_url: str) -> Iterator[str]:
    """The verifier and tenant acme's edge user, with the rules `specd acl` prints (broker.acl)."""
    admin = redis.Redis.from_url(redis_url)
    for rule in (verifier_rule(ACL_PREFIX, PASSWORDS["verifier"]),
                 edge_rule(ACL_PREFIX, "acme", PASSWORDS["edge-acme"])):
        _, name, *rules = rule.split(" ")
        admin.execute_command("ACL", "SETUSER", name, "reset", *rules)
    yield redis_url
    for user in PASSWORDS:
        admin.execute_command("ACL", "DELUSER", user)
    admin.close()


def acl_settings(url: str, tiny_pair: dict, user: str) -> Settings:
    return Settings(redis={"url": url, "key_prefix": ACL_PREFIX, "username": user,
                           "password": PASSWORDS[user]},
                    models={"target": tiny_pair["target"], "draft": tiny_pair["draft"]},
                    verifier={"idle_block_ms": 20, "acl_check": "strict"},
                    edge={"verdict_timeout_s": 30, "tenant": "acme", "worker_id": "acme-e1"})


async def test_finding3c_with_acls_a_tenant_mate_changes_no_token(acl_users, tiny_pair) -> None:
    """ACL users and no secret configured: the attacker is another edge of the same tenant (its own
    ACL user lets it XADD and XREAD on every session of the tenant, not read opens or meta); it is
    given the session ids (as if they leaked from logs)."""
    edge_settings = acl_settings(acl_users, tiny_pair, "edge-acme")
    async with pool(edge_settings, acl_settings(acl_users, tiny_pair, "verifier")) as (verifier, edge_broker):
        mate = connect(acl_users, 5, username="edge-acme", password=PASSWORDS["edge-acme"])
        attacker = Attacker(mate, Keys(ACL_PREFIX), can_read=False)
        try:
            await run_attacked(edge_settings, edge_broker, attacker, verifier)
        finally:
            await mate.aclose()
