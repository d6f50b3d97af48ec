"""Admission of requests: at most ``limit`` run at once; past it they wait in a bounded FIFO queue.

A request that finds a free slot and nobody waiting runs at once. Otherwise it joins the queue
(first come, first served: a freed slot goes to the oldest waiter, never to a newcomer) and gets
a 429 only when the queue is already full or its wait outlasts ``timeout_s``. A waiter that goes
away (its client disconnected, its handler was cancelled) leaves the queue; a slot handed to it
in the same instant is passed on, so no slot is ever lost.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from specd.serve import errors
from specd.serve.metrics import ServeMetrics

Release = Callable[[], None]


class Admission:
    def __init__(self, limit: int, queue_size: int, timeout_s: float, metrics: ServeMetrics) -> None:
        self.limit = limit
        self.queue_size = queue_size
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def acquire(self) -> Release:
        """A slot, at once or after a wait in the queue; ``APIError`` 429 when full or too late.

        Returns the slot's release (idempotent)."""
        started = time.perf_counter()
        if self.running < self.limit and not self._waiting:
            self.running += 1
        else:
            await self._wait_in_queue()  # the slot is handed over by a release: running unchanged
        self.metrics.queue_wait.observe(time.perf_counter() - started)
        self.metrics.in_flight.set(self.running)
        return self._releaser()

    async def _wait_in_queue(self) -> None:
        if len(self._waiting) >= self.queue_size:
            self.metrics.queue_rejected.labels("full").inc()
            raise errors.busy(self.limit, self.queue_size)
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        self._waiting.append(turn)
        self.metrics.queue_length.set(len(self._waiting))
        expiry = loop.call_later(self.timeout_s, _expire, turn)
        try:
            await turn
        except asyncio.TimeoutError:  # expired before any slot was handed to it
            self._leave(turn)
            self.metrics.queue_rejected.labels("timeout").inc()
            raise errors.queue_timeout(self.limit, self.timeout_s) from None
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self._hand_over()  # handed a slot as it was cancelled: pass the slot on
            self._leave(turn)
            raise
        finally:
            expiry.cancel()

    def _leave(self, turn: asyncio.Future[None]) -> None:
        if turn in self._waiting:
            self._waiting.remove(turn)
        self.metrics.queue_length.set(len(self._waiting))

    def _hand_over(self) -> None:
        """A slot was freed: to the oldest live waiter, else back to the pool."""
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                self.metrics.queue_length.set(len(self._waiting))
                return
        self.running -= 1
        self.metrics.queue_length.set(0)
        self.metrics.in_flight.set(self.running)

    def _releaser(self) -> Release:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._hand_over()

        return release


def _expire(turn: asyncio.Future[None]) -> None:
    if not turn.done():  # not handed a slot in time
        turn.set_exception(asyncio.TimeoutError())
