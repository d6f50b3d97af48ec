"""The verifier's KV arena: extents, roll-back, growth, compaction, release (pure, no model)."""

from __future__ import annotations

import gc

import pytest
import torch

from verifier_worker.kv import ArenaShape, KVArena, KVCapacityError, SessionKV

SHAPE = ArenaShape(layers=2, kv_heads=2, head_dim=4)


def arena(tokens: int = 64) -> KVArena:
    return KVArena(SHAPE, tokens, torch.float32, torch.device("cpu"))


def fill(a: KVArena, kv: SessionKV, count: int, value: float) -> None:
    """Write ``count`` positions of constant keys/values after the valid prefix."""
    block = torch.full((SHAPE.kv_heads, count, SHAPE.head_dim), value)
    for layer in range(SHAPE.layers):
        a.write(layer, kv.start + kv.length, block, -block)
    kv.length += count


def contents(a: KVArena, kv: SessionKV) -> list[float]:
    keys, values = a.view(1, kv.start, kv.start + kv.length)
    assert torch.equal(values, -keys)
    return keys[0, :, 0].tolist()


def test_extents_are_disjoint_and_views_do_not_copy() -> None:
    a, first, second = arena(), SessionKV(), SessionKV()
    a.allocate(first, 10)
    a.allocate(second, 20)
    assert (first.start, second.start) == (0, 10) and a.used_tokens == 30
    fill(a, first, 3, 1.0)
    fill(a, second, 2, 2.0)
    keys, _ = a.view(0, first.start, first.start + 3)
    assert keys.data_ptr() == a.keys[0].data_ptr()  # a view into the arena, not a copy
    assert contents(a, first) == [1.0] * 3 and contents(a, second) == [2.0] * 2
    first.truncate(1)
    assert first.length == 1 and first.nbytes() == 10 * a.bytes_per_token


def test_freed_extents_merge_and_are_reused() -> None:
    a = arena(30)
    kvs = [SessionKV() for _ in range(3)]
    for kv in kvs:
        a.allocate(kv, 10)
    kvs[0].clear()
    kvs[1].clear()
    assert a.free_tokens == 20 and a.sessions == 1
    again = SessionKV()
    a.allocate(again, 20)  # fits only because the two freed extents merged
    assert again.start == 0


def test_fragmented_arena_compacts_and_keeps_contents() -> None:
    a = arena(30)
    kvs = [SessionKV() for _ in range(3)]
    for i, kv in enumerate(kvs):
        a.allocate(kv, 10)
        fill(a, kv, 4, float(i))
    kvs[0].clear()
    kvs[2].clear()
    survivor, big = kvs[1], SessionKV()
    a.allocate(big, 20)  # 20 free in two 10-token holes: needs one compaction
    assert a.compactions == 1 and survivor.start == 0 and big.start == 10
    assert contents(a, survivor) == [1.0] * 4


def test_growing_an_extent_keeps_its_prefix() -> None:
    a, kv, other = arena(), SessionKV(), SessionKV()
    a.allocate(kv, 4)
    a.allocate(other, 4)
    fill(a, kv, 3, 7.0)
    a.allocate(kv, 12)
    assert kv.size == 12 and kv.length == 3 and contents(a, kv) == [7.0] * 3


def test_full_arena_raises_capacity_error() -> None:
    a, kv = arena(16), SessionKV()
    a.allocate(kv, 10)
    with pytest.raises(KVCapacityError, match="no KV room for 8 tokens"):
        a.allocate(SessionKV(), 8)


def test_dropped_session_gives_its_extent_back() -> None:
    a = arena(16)
    kv = SessionKV()
    a.allocate(kv, 16)
    del kv
    gc.collect()
    assert a.free_tokens == 16 and a.sessions == 0
