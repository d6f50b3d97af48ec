"""Network shaping: an edge-side Broker that adds a chosen delay and jitter to edge <-> broker traffic.

Edge-cloud round trips of 5-100 ms can then be studied on one machine. The added round-trip time
``delay_ms`` is split evenly between the two directions: a message the edge sends (session open,
draft) reaches Redis half a round trip later, and a verdict Redis holds reaches the edge half a
round trip after it was read. ``jitter_ms`` spreads each direction uniformly by +- half of it.
Per session and direction, deliveries keep their order (a later message never overtakes an
earlier one), as on a real TCP connection.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from broker.streams import Broker, Entry

T = TypeVar("T")


class ShapedBroker(Broker):
    """Delegates to ``inner`` after sleeping the one-way delay on each direction."""

    def __init__(self, inner: Broker, delay_ms: float, jitter_ms: float = 0.0,
                 rng: random.Random | None = None) -> None:
        super().__init__(inner.redis, inner.keys.prefix, inner.maxlen, inner.ttl)
        if delay_ms < 0 or jitter_ms < 0:
            raise ValueError("network delay and jitter must be >= 0")
        self.inner = inner
        self.delay_ms = delay_ms
        self.jitter_ms = jitter_ms
        self._rng = rng or random.Random()
        self._last_delivery: dict[tuple[str, str], float] = {}  # (direction, sid) -> monotonic
        self._order: dict[str, asyncio.Lock] = {}

    def one_way_s(self) -> float:
        """One direction's delay: half the round trip, +- half the jitter, never negative."""
        spread = self._rng.uniform(-self.jitter_ms, self.jitter_ms) / 2 if self.jitter_ms else 0.0
        return max(0.0, (self.delay_ms / 2 + spread) / 1000)

    def _deliver_at(self, direction: str, sid: str) -> float:
        key = (direction, sid)
        if len(self._last_delivery) > 100_000:  # forget deliveries long past (finished sessions)
            now = time.monotonic()
            self._last_delivery = {k: t for k, t in self._last_delivery.items() if t > now}
            self._order = {k: lock for k, lock in self._order.items() if ("up", k) in self._last_delivery}
        deliver_at = max(time.monotonic() + self.one_way_s(), self._last_delivery.get(key, 0.0))
        self._last_delivery[key] = deliver_at
        return deliver_at

    async def _travel(self, direction: str, sid: str) -> None:
        await asyncio.sleep(max(0.0, self._deliver_at(direction, sid) - time.monotonic()))

    async def _send_up(self, sid: str, send: Callable[[], Awaitable[T]]) -> T:
        """Sleep the uplink delay, then send; the per-session lock (FIFO) keeps sends in order."""
        deliver_at = self._deliver_at("up", sid)
        async with self._order.setdefault(sid, asyncio.Lock()):
            await asyncio.sleep(max(0.0, deliver_at - time.monotonic()))
            return await send()

    async def open_session(self, sid: str, payload: bytes, tag: bytes | None = None) -> None:
        await self._send_up(sid, lambda: self.inner.open_session(sid, payload, tag))

    async def send_draft(self, sid: str, payload: bytes, tag: bytes | None = None) -> str:
        return await self._send_up(sid, lambda: self.inner.send_draft(sid, payload, tag))

    async def read_verdicts(self, sid: str, last_id: str, block_ms: int) -> list[Entry]:
        entries = await self.inner.read_verdicts(sid, last_id, block_ms)
        if entries:
            await self._travel("down", sid)
        return entries

    async def delete_session(self, sid: str, verdict_ttl_s: int | None = None) -> None:
        self._last_delivery.pop(("up", sid), None)
        self._last_delivery.pop(("down", sid), None)
        self._order.pop(sid, None)
        await self.inner.delete_session(sid, verdict_ttl_s)

    async def close(self) -> None:
        await self.inner.close()
