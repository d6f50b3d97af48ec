"""A multiplexed verdict reader: one blocking XREAD over every waiting session's verdict stream.

The plain edge client blocks one XREAD (so one Redis connection) per waiting session; at
thousands of sessions per edge process that is thousands of connections and reads. This Broker
keeps one reader task per process: it reads the verdict streams of all sessions that wait, at
their last delivered ids, in one XREAD and hands each session its entries. A session that starts
waiting while the reader is blocked on a set without it wakes the reader through a private
stream. Entries that arrive for a session nobody is waiting on are buffered, never dropped.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from broker.streams import Broker, Entry, _entries, with_backoff

WAKE_FIELD = b"w"


def id_after(entry_id: str, last_id: str) -> bool:
    """Stream ids ``ms-seq`` compare as pairs of integers."""
    a, _, b = entry_id.partition("-")
    c, _, d = last_id.partition("-")
    return (int(a), int(b or 0)) > (int(c), int(d or 0))


@dataclass
class _Tail:
    last_id: str  # the newest entry id read from the session's verdict stream
    buffer: list[Entry] = field(default_factory=list)
    waiter: asyncio.Future[list[Entry]] | None = None
    seen: float = field(default_factory=time.monotonic)


class MultiplexedBroker(Broker):
    """A Broker whose ``read_verdicts`` is served by one shared XREAD per process."""

    def __init__(self, inner: Broker, block_ms: int = 1000, idle_forget_s: float = 30.0,
                 tenant: str = "default") -> None:
        super().__init__(inner.redis, inner.keys.prefix, inner.maxlen, inner.ttl)
        self.inner = inner
        self.block_ms = block_ms
        self.idle_forget_s = idle_forget_s
        # In the tenant's key space (its ACL covers it): ``{prefix}:{<tenant>.mux-<uuid>}:wake``.
        self.wake_key = inner.keys.wake(tenant, uuid.uuid4().hex)
        self._wake_last = "0-0"
        self._tails: dict[str, _Tail] = {}
        self._reader: asyncio.Task[None] | None = None
        self._reading: frozenset[str] | None = None  # sessions of the XREAD now blocked
        self._woken = False
        self.reads = 0  # XREADs issued (reported by load tests)

    async def read_verdicts(self, sid: str, last_id: str, block_ms: int) -> list[Entry]:
        if self.cluster:  # one XREAD may not span slots: each session blocks its own read
            return await self.inner.read_verdicts(sid, last_id, block_ms)
        tail = self._tails.setdefault(sid, _Tail(last_id))
        tail.seen = time.monotonic()
        ready = [e for e in tail.buffer if id_after(e.entry_id, last_id)]
        tail.buffer.clear()
        if ready:
            return ready
        future: asyncio.Future[list[Entry]] = asyncio.get_running_loop().create_future()
        tail.waiter = future
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_loop())
        elif self._reading is not None and sid not in self._reading:
            await self._wake()
        try:
            await asyncio.wait_for(asyncio.shield(future), block_ms / 1000)
        except TimeoutError:
            pass
        finally:
            if tail.waiter is future:
                tail.waiter = None
        if future.done():
            return future.result()
        future.cancel()
        return []

    async def _wake(self) -> None:
        """Make the blocked XREAD return so the next one includes the new waiter's stream."""
        if self._woken:
            return
        self._woken = True
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self.wake_key, {WAKE_FIELD: b"1"}, maxlen=10, approximate=False)
            pipe.expire(self.wake_key, self.ttl)
            await pipe.execute()

    async def _read_loop(self) -> None:
        while any(t.waiter is not None for t in self._tails.values()):
            self._forget_idle()
            offsets: dict[Any, Any] = {self.keys.verdicts(sid): t.last_id for sid, t in self._tails.items()}
            offsets[self.wake_key] = self._wake_last
            self._reading, self._woken = frozenset(self._tails), False
            try:
                reply = await with_backoff(
                    lambda: self.redis.xread(offsets, block=self.block_ms, count=64),  # noqa: B023
                    "read_verdicts")
            except ResponseError as exc:  # one session's verdict key replaced: it fails, the rest read on
                await self._fail_unreadable(list(offsets), exc)
                continue
            finally:
                self._reading = None
            self.reads += 1
            self._dispatch(_entries(reply))

    async def _fail_unreadable(self, keys: list[Any], exc: ResponseError) -> None:
        """Hand the error to the sessions whose verdict keys are not streams; every other session
        keeps waiting. Without one to blame (e.g. an ACL refusal) every waiter gets the error."""
        bad = set(await self.not_streams([k for k in keys if k != self.wake_key]))
        for sid, tail in list(self._tails.items()):
            if bad and self.keys.verdicts(sid) not in bad:
                continue
            del self._tails[sid]
            if tail.waiter is not None and not tail.waiter.done():
                tail.waiter.set_exception(exc)

    def _dispatch(self, entries: list[Entry]) -> None:
        per_session: dict[str, list[Entry]] = {}
        for entry in entries:
            if entry.stream == self.wake_key:
                self._wake_last = entry.entry_id
                continue
            per_session.setdefault(self.keys.session_of(entry.stream), []).append(entry)
        for sid, mine in per_session.items():
            tail = self._tails.get(sid)
            if tail is None:
                continue
            tail.last_id = mine[-1].entry_id
            if tail.waiter is not None and not tail.waiter.done():
                tail.waiter.set_result([*tail.buffer, *mine])
                tail.buffer.clear()
            else:
                tail.buffer.extend(mine)

    def _forget_idle(self) -> None:
        """Drop sessions nobody has waited on for a while (finished ones): keeps XREADs small."""
        cutoff = time.monotonic() - self.idle_forget_s
        for sid in [s for s, t in self._tails.items()
                    if t.waiter is None and not t.buffer and t.seen < cutoff]:
            del self._tails[sid]

    @property
    def sessions(self) -> int:
        return len(self._tails)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self.inner.close()
