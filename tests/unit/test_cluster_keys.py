"""Cluster mode's pure parts: seed URLs, the shard-tagged key layout, slot grouping."""

from __future__ import annotations

import pytest

from broker.acl import edge_rule
from broker.cluster import by_slot, is_cluster_url, seed_nodes, slot_groups, slot_of
from broker.streams import Keys, shard_of
from common.settings import RedisSettings


def test_seed_nodes_from_a_cluster_url() -> None:
    assert is_cluster_url("redis+cluster://a:1,b:2") and is_cluster_url("rediss+cluster://a:1")
    assert not is_cluster_url("redis://a:1")
    assert seed_nodes("redis+cluster://u:p@10.0.0.1:7000,10.0.0.2:7001/0") == [("10.0.0.1", 7000),
                                                                              ("10.0.0.2", 7001)]
    with pytest.raises(ValueError, match="host:port"):
        seed_nodes("redis+cluster://nohost")


def test_settings_accept_cluster_urls() -> None:
    assert RedisSettings(url="redis+cluster://a:1,b:2").url.startswith("redis+cluster://")
    with pytest.raises(ValueError):
        RedisSettings(url="cluster://a:1")


def test_sharded_keys_share_a_slot_per_shard_and_name_their_session() -> None:
    keys = Keys("specd", shards=8)
    sid = "acme.0123abcd"
    session = [keys.drafts(sid), keys.verdicts(sid), keys.state(sid), keys.tokens(sid), keys.meta(sid),
               keys.lease(sid)]
    assert len({slot_of(k) for k in session}) == 1  # the fenced scripts need one slot
    assert keys.drafts(sid) == f"specd:{{acme.s{shard_of(sid, 8)}}}:{sid}:drafts"
    assert keys.session_of(keys.drafts("acme.a:b")) == "acme.a:b"
    many = [keys.drafts(f"acme.{i:04d}") for i in range(500)]
    assert len(by_slot(many)) == 8  # 500 sessions, 8 slot groups
    # The tenant's ACL pattern covers the sharded layout as it does the per-session one.
    assert "~specd:{acme.*}:*" in edge_rule("specd", "acme")
    assert Keys("specd").drafts(sid) == f"specd:{{{sid}}}:drafts"  # one node: unchanged


def test_slot_groups_bound_their_size() -> None:
    keys = [f"{{t.s{i % 3}}}:x{i}" for i in range(10)]
    groups = slot_groups(keys, cluster=True, size=2)
    assert sorted(i for g in groups for i in g) == list(range(10))
    assert all(len(g) <= 2 and len({slot_of(keys[i]) for i in g}) == 1 for g in groups)
    assert slot_groups(keys, cluster=False, size=64) == [list(range(10))]


async def test_slot_reader_keeps_one_read_in_flight_per_slot_group() -> None:
    import asyncio

    from broker.cluster import SlotReader

    calls: list[tuple[list[str], int | None]] = []
    release = asyncio.Event()

    async def read(keys: list[str], block: int | None, count: int) -> list[str]:
        calls.append((keys, block))
        if block is not None:
            await release.wait()  # a blocking read answers when an entry arrives
        return [f"{k}#1" for k in keys]

    reader: SlotReader[str] = SlotReader(read)
    streams = ["{a}:1", "{a}:2", "{b}:1"]
    assert sorted(await reader.read(streams, None, 8)) == ["{a}:1#1", "{a}:2#1", "{b}:1#1"]
    assert len(calls) == 2  # one read per slot group, not per stream
    assert await reader.read(streams, 10, 8) == []  # blocked: nothing within the block
    assert await reader.read(streams, None, 8) == []  # still in flight: not read twice
    assert len(calls) == 4
    release.set()
    await asyncio.sleep(0.01)
    assert len(await reader.read(streams, None, 8)) == 3  # the blocked reads answered
    reader.close()
