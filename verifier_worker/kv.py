"""The verifier's KV memory: one preallocated pool of fixed-size blocks per worker (paged, as vLLM).

The arena holds, per layer, keys and values ``[num_blocks, block_tokens, kv_heads, head_dim]``
allocated once (zeroed; on a GPU the budget is claimed at start-up). A session owns a
block table: the blocks it has filled so far, in order, so position ``i`` of its cache lives at
slot ``blocks[i // block_tokens] * block_tokens + i % block_tokens``. A session grows one block at
a time as its context does, so it holds what it uses (at most one partly filled block more), not
a reserve for ``max_new_tokens``; nothing is ever moved or compacted. Rolling back is moving
``length``; freeing returns the blocks.

Where a session's new blocks go (``KVArena._place``) keeps its blocks consecutive where it can, so
attention can read its cache in place (a few views) instead of gathering a copy of it every layer
(``verifier_worker.engine``): a growing session takes the block right after its last one when that
is free; otherwise a new run of blocks goes in the middle of the largest free run (the room on
either side left to the session before it and to this one to grow into), or first fit while the
session holds at most ``SMALL_SESSION_BLOCKS`` (a request that short may never grow: it fills
holes instead of splitting a large free run). When a pass needs more blocks than are free, the caches
of sessions outside the pass are dropped (``preemptions``) and rebuilt from their context when
they return, as vLLM's recompute preemption does; which ones is a policy given to the arena
(``capacity.lru_victims``: least recently used first). Only a pass that cannot fit even then
raises ``KVCapacityError``. What a new session may take is not the arena's to decide
(``capacity.decide_admission``): the arena only reports ``admission_budget``. A ``SessionKV``
dropped without ``clear()`` gives its blocks back when it is garbage-collected.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from verifier_worker.capacity import lru_victims

DEFAULT_BLOCK_TOKENS = 16
SMALL_SESSION_BLOCKS = 2
"""Up to this many blocks a session's blocks are placed first fit (see ``KVArena._place``)."""
GROWTH_HEADROOM = 0.3
"""Share of the budget admission leaves free for resident sessions to grow into."""


class KVCapacityError(RuntimeError):
    """The arena has no room for a pass's blocks even after dropping idle caches."""


class SessionKV:
    """The target's cache of one session: positions ``0 .. length - 1`` of its blocks are valid."""

    _ids = itertools.count()

    def __init__(self) -> None:
        self.arena: KVArena | None = None
        self.blocks: list[int] = []  # the block table, in position order
        self.length = 0
        self.key = next(SessionKV._ids)
        self.last_used = 0  # the arena's pass counter when a pass last fed this session

    @property
    def allocated(self) -> bool:
        return self.arena is not None

    @property
    def size(self) -> int:
        """Token positions this session's blocks hold."""
        return len(self.blocks) * self.arena.block_tokens if self.arena is not None else 0

    def nbytes(self) -> int:
        """Bytes of arena memory this session holds."""
        return self.size * self.arena.bytes_per_token if self.arena is not None else 0

    def truncate(self, keep: int) -> None:
        """Roll back to the first ``keep`` positions (a no-op if already shorter)."""
        self.length = min(self.length, keep)

    def clear(self) -> None:
        """Drop the cache and give the blocks back (recomputed from the context if needed)."""
        if self.arena is not None:
            self.arena.free(self)
        self.length = 0


@dataclass(frozen=True)
class ArenaShape:
    layers: int
    kv_heads: int
    head_dim: int


Preemption = Callable[[list[SessionKV], int], list[SessionKV]]
"""Given the caches outside a pass and the blocks missing, the caches to drop."""


class KVArena:
    """Fixed KV budget of one worker, handed out block by block."""

    def __init__(self, shape: ArenaShape, budget_tokens: int, dtype: torch.dtype,
                 device: torch.device, block_tokens: int = DEFAULT_BLOCK_TOKENS,
                 preemption: Preemption = lru_victims) -> None:
        self.shape = shape
        self.preemption = preemption
        self.block_tokens = block_tokens
        self.num_blocks = max(1, budget_tokens // block_tokens)
        self.budget_tokens = self.num_blocks * block_tokens
        dims = (self.num_blocks, block_tokens, shape.kv_heads, shape.head_dim)
        # Zeros, not empty: a pass reads padding slots under a zero mask weight, and 0 * NaN from
        # uninitialised memory would poison the output. Stale keys left by freed blocks are finite.
        self.keys = [torch.zeros(dims, dtype=dtype, device=device) for _ in range(shape.layers)]
        self.values = [torch.zeros(dims, dtype=dtype, device=device) for _ in range(shape.layers)]
        element = self.keys[0].element_size()
        self.bytes_per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * element
        self._gathered_k = torch.empty((0, *dims[1:]), dtype=dtype, device=device)  # see gather()
        self._gathered_v = self._gathered_k
        self._is_free = np.ones(self.num_blocks, dtype=bool)  # the free map (see _place)
        self._free_count = self.num_blocks
        self._owners: dict[int, weakref.ref[SessionKV]] = {}  # SessionKV.key -> holder
        self.preemptions = 0
        self.passes = 0
        # Passes run in a worker thread while the event loop may free blocks (lost or evicted
        # sessions), and the garbage collector may free some inside either: re-entrant lock.
        self._lock = threading.RLock()

    @property
    def used_tokens(self) -> int:
        return (self.num_blocks - self._free_count) * self.block_tokens

    @property
    def sessions(self) -> int:
        return len(self._owners)

    @property
    def free_tokens(self) -> int:
        return self._free_count * self.block_tokens

    @property
    def admission_budget(self) -> int:
        """Tokens admission may fill: the budget less the growth headroom."""
        return self.budget_tokens - int(self.budget_tokens * GROWTH_HEADROOM)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)

    def allocate(self, kv: SessionKV, tokens: int) -> None:
        """Make ``kv``'s blocks hold ``tokens`` positions (appending blocks; its prefix stays).

        Raises ``KVCapacityError`` when they do not fit; ``kv`` then keeps what it had.
        """
        with self._lock:
            if kv.arena is not None and kv.arena is not self:
                kv.arena.free(kv)
            missing = self.blocks_for(tokens) - len(kv.blocks)
            if missing <= 0:
                return
            if missing > self._free_count:
                raise KVCapacityError(f"no KV room for {tokens} tokens ({self.free_tokens} of "
                                      f"{self.budget_tokens} free)")
            if kv.arena is None:
                kv.arena = self
                self._own(kv)
            kv.blocks.extend(self._place(kv.blocks, missing))

    def allocate_pass(self, needs: list[tuple[SessionKV, int]]) -> None:
        """Blocks for every session of a pass, dropping caches of sessions outside it (chosen by
        the arena's preemption policy) if the free blocks do not suffice."""
        with self._lock:
            self.passes += 1
            missing = sum(max(0, self.blocks_for(tokens) - (len(kv.blocks) if kv.arena is self
                                                             else 0)) for kv, tokens in needs)
            if missing > self._free_count:
                self._preempt(missing - self._free_count, {kv.key for kv, _ in needs})
            for kv, tokens in needs:
                self.allocate(kv, tokens)
                kv.last_used = self.passes

    def free(self, kv: SessionKV) -> None:
        with self._lock:
            ref = self._owners.get(kv.key)
            if ref is not None and ref() is kv:
                del self._owners[kv.key]
                self._release(kv.blocks)
            kv.arena, kv.blocks, kv.length = None, [], 0

    def slots(self, kv: SessionKV, start: int, end: int) -> torch.Tensor:
        """Flat slot indices (``block * block_tokens + offset``) of positions ``start .. end - 1``."""
        positions = torch.arange(start, end)
        table = torch.tensor(kv.blocks, dtype=torch.long)
        return table[positions // self.block_tokens] * self.block_tokens + positions % self.block_tokens

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``[n, kv_heads, head_dim]`` keys/values at flat ``slots`` ``[n]`` (one scatter each)."""
        self.keys[layer].view(-1, *self.keys[layer].shape[2:]).index_copy_(0, slots, keys)
        self.values[layer].view(-1, *self.values[layer].shape[2:]).index_copy_(0, slots, values)

    def gather(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``blocks`` ``[n]``, in order: ``[n, block_tokens, kv_heads, head_dim]``
        each, in buffers reused by every layer and pass (valid until the next ``gather``).

        A fresh output per call would cost page faults on every pass on a CPU (measured: a
        32 MB gather takes 35 ms fresh, 6 ms into a reused buffer)."""
        count = blocks.numel()
        if count > self._gathered_k.shape[0]:
            dims = (count, *self.keys[layer].shape[1:])
            self._gathered_k = torch.empty(dims, dtype=self.keys[layer].dtype, device=blocks.device)
            self._gathered_v = torch.empty_like(self._gathered_k)
        k, v = self._gathered_k[:count], self._gathered_v[:count]
        torch.index_select(self.keys[layer], 0, blocks, out=k)
        torch.index_select(self.values[layer], 0, blocks, out=v)
        return k, v

    def extent(self, layer: int, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (not copies) of ``length`` consecutive slots from flat slot ``start``:
        ``[length, kv_heads, head_dim]`` keys and values (a session whose blocks are consecutive)."""
        keys, values = self.keys[layer], self.values[layer]
        return (keys.view(-1, *keys.shape[2:])[start:start + length],
                values.view(-1, *values.shape[2:])[start:start + length])

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the keys/values at flat ``slots`` ``[n]``: ``[n, kv_heads, head_dim]`` each."""
        keys, values = self.keys[layer], self.values[layer]
        return (keys.view(-1, *keys.shape[2:]).index_select(0, slots),
                values.view(-1, *values.shape[2:]).index_select(0, slots))

    # ------------------------------------------------------------------ internals

    def _place(self, held: list[int], count: int) -> list[int]:
        """``count`` free blocks for a session holding ``held``, marked taken (caller checked
        that enough are free): consecutive after its last block where free, then new runs."""
        taken: list[int] = []
        is_free = self._is_free
        if held:
            after = held[-1] + 1
            while len(taken) < count and after < self.num_blocks and is_free[after]:
                taken.append(after)
                after += 1
        if len(held) + count <= SMALL_SESSION_BLOCKS:  # first fit: the lowest free blocks
            while len(taken) < count:
                is_free[taken] = False
                taken.append(int(np.argmax(is_free)))
        while len(taken) < count:
            is_free[taken] = False  # so the free runs below exclude what this call took
            edges = np.flatnonzero(np.diff(np.concatenate(([False], is_free, [False])).astype(np.int8)))
            starts, ends = edges[0::2], edges[1::2]  # free runs [start, end)
            widest = int(np.argmax(ends - starts))
            start, length = int(starts[widest]), int(ends[widest] - starts[widest])
            need = count - len(taken)
            if length > need and start > 0:  # halve the spare room with the run's left owner
                start += (length - need) // 2
            taken.extend(range(start, start + min(need, length)))
        is_free[taken] = False
        self._free_count -= len(taken)
        return taken

    def _release(self, blocks: list[int]) -> None:
        self._is_free[blocks] = True
        self._free_count += len(blocks)

    def _own(self, kv: SessionKV) -> None:
        key, blocks = kv.key, kv.blocks

        def collected(ref: weakref.ref[SessionKV]) -> None:
            with self._lock:
                if self._owners.get(key) is ref:
                    del self._owners[key]
                    self._release(blocks)

        self._owners[key] = weakref.ref(kv, collected)

    def _preempt(self, blocks: int, protected: set[int]) -> None:
        """Drop the caches the preemption policy picks among those outside ``protected``."""
        holders = [kv for ref in list(self._owners.values()) if (kv := ref()) is not None
                   and kv.key not in protected and kv.blocks]
        for kv in self.preemption(holders, blocks):
            self.free(kv)
            self.preemptions += 1
