"""The verifier's paged KV arena: block tables, roll-back, growth, preemption, release (no model)."""

from __future__ import annotations

import gc

import pytest
import torch

from verifier_worker.kv import ArenaShape, KVArena, KVCapacityError, SessionKV

SHAPE = ArenaShape(layers=2, kv_heads=2, head_dim=4)


def arena(tokens: int = 64, block: int = 4) -> KVArena:
    return KVArena(SHAPE, tokens, torch.float32, torch.device("cpu"), block_tokens=block)


def fill(a: KVArena, kv: SessionKV, count: int, value: float) -> None:
    """Write ``count`` positions of constant keys/values after the valid prefix."""
    a.allocate(kv, kv.length + count)
    block = torch.full((count, SHAPE.kv_heads, SHAPE.head_dim), value)
    slots = a.slots(kv, kv.length, kv.length + count)
    for layer in range(SHAPE.layers):
        a.write(layer, slots, block, -block)
    kv.length += count


def contents(a: KVArena, kv: SessionKV) -> list[float]:
    keys, values = a.read(1, a.slots(kv, 0, kv.length))
    assert torch.equal(values, -keys)
    return keys[:, 0, 0].tolist()


def test_sessions_hold_whole_blocks_of_what_they_use() -> None:
    a, first, second = arena(), SessionKV(), SessionKV()
    fill(a, first, 3, 1.0)
    fill(a, second, 5, 2.0)
    assert first.size == 4 and second.size == 8 and a.used_tokens == 12
    assert not set(first.blocks) & set(second.blocks)
    assert contents(a, first) == [1.0] * 3 and contents(a, second) == [2.0] * 5
    first.truncate(1)
    assert first.length == 1 and first.nbytes() == 4 * a.bytes_per_token


def test_growing_appends_blocks_and_keeps_the_prefix() -> None:
    a, kv, other = arena(), SessionKV(), SessionKV()
    fill(a, kv, 3, 7.0)
    fill(a, other, 4, 1.0)  # interleaves: kv's blocks are no longer contiguous
    fill(a, kv, 6, 8.0)
    assert kv.size == 12 and contents(a, kv) == [7.0] * 3 + [8.0] * 6
    assert contents(a, other) == [1.0] * 4


def test_freed_blocks_are_reused() -> None:
    a = arena(16)
    kvs = [SessionKV() for _ in range(4)]
    for kv in kvs:
        fill(a, kv, 4, 0.0)
    kvs[0].clear()
    kvs[2].clear()
    assert a.free_tokens == 8 and a.sessions == 2
    again = SessionKV()
    fill(a, again, 8, 3.0)  # fits in the two freed, non-adjacent blocks: no compaction needed
    assert contents(a, again) == [3.0] * 8 and a.free_tokens == 0


def test_full_arena_raises_capacity_error_and_keeps_what_was_held() -> None:
    a, kv = arena(16), SessionKV()
    fill(a, kv, 10, 1.0)
    with pytest.raises(KVCapacityError, match="no KV room for 8 tokens"):
        a.allocate(SessionKV(), 8)
    assert contents(a, kv) == [1.0] * 10


def test_a_pass_that_does_not_fit_drops_the_least_recently_used_caches_outside_it() -> None:
    a = arena(16)
    old, recent, busy = SessionKV(), SessionKV(), SessionKV()
    a.allocate_pass([(old, 4)])
    a.allocate_pass([(recent, 4)])
    a.allocate_pass([(busy, 8)])
    a.allocate_pass([(busy, 12)])  # one block short: the oldest idle cache goes
    assert not old.allocated and recent.allocated and busy.size == 12 and a.preemptions == 1
    with pytest.raises(KVCapacityError):
        a.allocate_pass([(busy, 20)])  # more than the whole budget


def test_dropped_session_gives_its_blocks_back() -> None:
    a = arena(16)
    kv = SessionKV()
    a.allocate(kv, 16)
    del kv
    gc.collect()
    assert a.free_tokens == 16 and a.sessions == 0
