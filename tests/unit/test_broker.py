"""Broker logic on fakeredis (no blocking reads with COUNT here: fakeredis returns at once)."""

from __future__ import annotations

import fakeredis
import pytest

from broker.streams import GROUP, Broker, RoundResult


@pytest.fixture
async def broker():
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    b = Broker(client, prefix="t", maxlen=20, session_ttl_s=30)
    yield b
    await b.close()


def test_session_keys_share_a_cluster_hash_tag() -> None:
    keys = Broker.__new__(Broker)
    from broker.streams import Keys

    k = Keys("specd")
    assert {key[key.index("{"): key.index("}") + 1] for key in k.session_keys("abc")} == {"{abc}"}
    assert k.session_of(k.drafts("abc")) == "abc"
    del keys


async def test_group_creation_is_idempotent(broker: Broker) -> None:
    await broker.ensure_group("t:opens:{default}")
    await broker.ensure_group("t:opens:{default}")
    groups = await broker.redis.xinfo_groups("t:opens:{default}")
    assert len(groups) == 1


async def test_draft_is_acked_only_with_its_verdict(broker: Broker) -> None:
    stream = broker.keys.drafts("s1")
    await broker.ensure_group(stream)
    await broker.send_draft("s1", b"draft-0")
    [entry] = await broker.read_work("w1", [stream], block_ms=None)
    assert entry.payload == b"draft-0"
    assert (await broker.redis.xpending(stream, GROUP))["pending"] == 1
    await broker.publish_round([RoundResult("s1", b"verdict-0", [entry.entry_id], {"next_seq": 1})])
    assert (await broker.redis.xpending(stream, GROUP))["pending"] == 0
    [verdict] = await broker.read_verdicts("s1", "0-0", block_ms=1)
    assert verdict.payload == b"verdict-0"
    assert await broker.redis.hget(broker.keys.state("s1"), "next_seq") == b"1"


async def test_a_commit_appends_only_new_tokens_and_gives_every_session_key_a_ttl(broker: Broker) -> None:
    from broker.pool import PoolBroker
    from broker.rounds import DONE, FENCED, Commit, RoundWriter

    stream = broker.keys.drafts("s1")
    await broker.ensure_group(stream)
    await broker.send_draft("s1", b"d")
    [entry] = await broker.read_work("w1", [stream], block_ms=None)
    lease = await PoolBroker(broker).acquire("s1", "w1", 5000)
    assert lease == "w1/1"
    writer = RoundWriter(broker)
    first = Commit("s1", lease, 0, b"\x01\0\0\0\x02\0\0\0", 1, b"v0", b"m", entry.entry_id, full=True)
    assert await writer.commit([first]) == [DONE]
    assert await writer.commit([Commit("s1", lease, 8, b"\x03\0\0\0", 2, b"v1", b"m", "")]) == [DONE]
    assert await broker.load_tokens("s1") == b"\x01\0\0\0\x02\0\0\0\x03\0\0\0"
    assert await broker.redis.xlen(stream) == 0  # acked and deleted with its verdict
    # The same commit again (a lost reply, retried) is idempotent; a stale expectation is answered.
    assert await writer.commit([Commit("s1", lease, 8, b"\x03\0\0\0", 2, b"v1", b"m", "")]) == [DONE]
    assert await writer.commit([Commit("s1", lease, 4, b"\x09\0\0\0", 2, b"v1", b"m", "")]) == [12]
    # Another lease value (a worker that lost the lease) writes nothing.
    assert await writer.commit([Commit("s1", "w2/1", 12, b"\x04\0\0\0", 3, b"x", b"m", "")]) == [FENCED]
    assert not await writer.notice("s1", "w2/1", b"x", b"m")
    assert not await writer.finish("s1", "w2/1", 10, "done")
    for key in broker.keys.session_keys("s1"):
        assert 0 < await broker.redis.ttl(key) <= 30, key


async def test_streams_are_trimmed(broker: Broker) -> None:
    for i in range(500):
        await broker.send_draft("s1", b"%d" % i)
    assert await broker.redis.xlen(broker.keys.drafts("s1")) < 200


async def test_pending_entries_are_redelivered_and_claimable(broker: Broker) -> None:
    stream = broker.keys.drafts("s1")
    await broker.ensure_group(stream)
    await broker.send_draft("s1", b"d0")
    await broker.read_work("w1", [stream], block_ms=None)
    # The same consumer after a restart sees its unacknowledged entry again ...
    [again] = await broker.read_pending("w1", stream)
    assert again.payload == b"d0"
    # ... and another consumer can claim it once it is idle.
    claimed = await broker.claim_idle("w2", stream, min_idle_ms=0)
    assert [e.payload for e in claimed] == [b"d0"]


async def test_heartbeat(broker: Broker) -> None:
    assert not await broker.healthy("verifier", "w1")
    await broker.heartbeat("verifier", "w1", 10, b"{}")
    assert await broker.healthy("verifier", "w1")
    await broker.clear_heartbeat("verifier", "w1")
    assert not await broker.healthy("verifier", "w1")
