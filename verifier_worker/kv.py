"""The verifier's KV memory: one preallocated arena per worker, one contiguous extent per session.

The arena holds, per layer, keys and values ``[kv_heads, budget_tokens, head_dim]`` allocated once
(``torch.empty``: on a GPU the budget is claimed at start-up; on a CPU pages are committed as they
are written). A session owns an extent of ``reserve`` token positions: its prompt, its
``max_new_tokens`` and room for one round's draft. A forward pass writes only the new tokens' keys
into the extent and attends to a view of it, so no cache is gathered or copied per pass. Rolling
back is moving ``length``; freeing returns the extent to a first-fit free list. When free memory is
fragmented, live extents are moved down once (``compactions`` counts it), which is the only copy.
A ``SessionKV`` dropped without ``clear()`` gives its extent back when it is garbage-collected.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from dataclasses import dataclass

import torch


class KVCapacityError(RuntimeError):
    """The arena has no room for an extent even after compaction."""


class SessionKV:
    """The target's cache of one session: positions ``0 .. length - 1`` of its extent are valid."""

    def __init__(self) -> None:
        self.arena: KVArena | None = None
        self.start = 0
        self.size = 0  # reserved token positions; 0 while the session holds no extent
        self.length = 0

    @property
    def allocated(self) -> bool:
        return self.arena is not None

    def nbytes(self) -> int:
        """Bytes of arena memory this session reserves."""
        return self.size * self.arena.bytes_per_token if self.arena is not None else 0

    def truncate(self, keep: int) -> None:
        """Roll back to the first ``keep`` positions (a no-op if already shorter)."""
        self.length = min(self.length, keep)

    def clear(self) -> None:
        """Drop the cache and give the extent back (recomputed from the context if needed)."""
        if self.arena is not None:
            self.arena.free(self)
        self.length = 0


@dataclass(frozen=True)
class ArenaShape:
    layers: int
    kv_heads: int
    head_dim: int


class KVArena:
    """Fixed KV budget of one worker, handed out as contiguous per-session extents."""

    def __init__(self, shape: ArenaShape, budget_tokens: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.shape = shape
        self.budget_tokens = budget_tokens
        dims = (shape.kv_heads, budget_tokens, shape.head_dim)
        self.keys = [torch.empty(dims, dtype=dtype, device=device) for _ in range(shape.layers)]
        self.values = [torch.empty(dims, dtype=dtype, device=device) for _ in range(shape.layers)]
        element = self.keys[0].element_size()
        self.bytes_per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * element
        self._free: list[tuple[int, int]] = [(0, budget_tokens)]  # sorted (start, size)
        self._owners: dict[int, weakref.ref[SessionKV]] = {}  # extent start -> holder
        self.compactions = 0
        # Passes run in a worker thread while the event loop may free extents (lost or evicted
        # sessions), and the garbage collector may free one inside either: re-entrant lock.
        self._lock = threading.RLock()

    @property
    def used_tokens(self) -> int:
        return self.budget_tokens - sum(size for _, size in self._free)

    @property
    def sessions(self) -> int:
        return len(self._owners)

    @property
    def free_tokens(self) -> int:
        return self.budget_tokens - self.used_tokens

    def allocate(self, kv: SessionKV, tokens: int) -> None:
        """Give ``kv`` an extent of ``tokens`` positions; growing one keeps its valid prefix.

        Raises ``KVCapacityError`` when the tokens do not fit; ``kv`` then holds nothing.
        """
        with self._lock:
            if kv.arena is self and kv.size >= tokens:
                return
            saved = self._save(kv) if kv.arena is self and kv.length else None
            if kv.arena is not None:
                kv.arena.free(kv)
            start = self._first_fit(tokens)
            if start is None and tokens <= self.free_tokens:
                self.compact()
                start = self._first_fit(tokens)
            if start is None:
                raise KVCapacityError(f"no KV room for {tokens} tokens ({self.free_tokens} of "
                                      f"{self.budget_tokens} free)")
            kv.arena, kv.start, kv.size, kv.length = self, start, tokens, 0
            self._own(kv)
            if saved is not None:
                self._restore(kv, saved)

    def free(self, kv: SessionKV) -> None:
        with self._lock:
            self._release(kv)
            kv.arena, kv.start, kv.size, kv.length = None, 0, 0, 0

    def write(self, layer: int, position: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``[kv_heads, n, head_dim]`` keys/values at arena positions ``position ..``."""
        end = position + keys.shape[1]
        self.keys[layer][:, position:end] = keys
        self.values[layer][:, position:end] = values

    def view(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (no copy) of arena positions ``start .. end - 1``: ``[kv_heads, n, head_dim]``."""
        return self.keys[layer][:, start:end], self.values[layer][:, start:end]

    def compact(self) -> None:
        """Move every live extent down so the free space is one block (the arena's only copy)."""
        with self._lock:
            self._compact()

    def _compact(self) -> None:
        position = 0
        for start in sorted(self._owners):
            kv = self._owners.pop(start)()
            if kv is None:
                continue
            if start != position and kv.length:
                self._move(start, position, kv.length)
            kv.start = position
            self._own(kv)
            position += kv.size
        self._free = [(position, self.budget_tokens - position)] if position < self.budget_tokens else []
        self.compactions += 1

    # ------------------------------------------------------------------ internals

    def _first_fit(self, tokens: int) -> int | None:
        for index, (start, size) in enumerate(self._free):
            if size >= tokens:
                if size == tokens:
                    del self._free[index]
                else:
                    self._free[index] = (start + tokens, size - tokens)
                return start
        return None

    def _own(self, kv: SessionKV) -> None:
        start, size = kv.start, kv.size

        def collected(ref: weakref.ref[SessionKV]) -> None:
            with self._lock:
                if self._owners.get(start) is ref:
                    self._give_back(start, size)

        self._owners[start] = weakref.ref(kv, collected)

    def _release(self, kv: SessionKV) -> None:
        ref = self._owners.get(kv.start)
        if ref is not None and ref() is kv:
            self._give_back(kv.start, kv.size)

    def _give_back(self, start: int, size: int) -> None:
        del self._owners[start]
        index = bisect.bisect(self._free, (start, 0))
        self._free.insert(index, (start, size))
        self._merge_around(index)

    def _merge_around(self, index: int) -> None:
        """Coalesce the free block at ``index`` with its neighbours."""
        if index + 1 < len(self._free):
            start, size = self._free[index]
            after_start, after_size = self._free[index + 1]
            if start + size == after_start:
                self._free[index] = (start, size + after_size)
                del self._free[index + 1]
        if index > 0:
            before_start, before_size = self._free[index - 1]
            start, size = self._free[index]
            if before_start + before_size == start:
                self._free[index - 1] = (before_start, before_size + size)
                del self._free[index]

    def _save(self, kv: SessionKV) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [tuple(t.clone() for t in self.view(layer, kv.start, kv.start + kv.length))  # type: ignore[misc]
                for layer in range(self.shape.layers)]

    def _restore(self, kv: SessionKV, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for layer, (keys, values) in enumerate(saved):
            self.write(layer, kv.start, keys, values)
        kv.length = saved[0][0].shape[1]

    def _move(self, source: int, dest: int, length: int) -> None:
        for buffers in (self.keys, self.values):
            for tensor in buffers:
                tensor[:, dest:dest + length] = tensor[:, source:source + length].clone()
