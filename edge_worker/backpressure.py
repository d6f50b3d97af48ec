"""Edge-side backpressure: react to the verifier load carried by every verdict.

A verdict's ``pool_load`` is its verifier's utilisation when the draft was batched: the larger
of (ready draft tokens / batch token budget), (ready sessions / batch session budget) and
(reserved KV / KV budget). Below 1 nothing binds and the edge drafts as configured. At or above
1 the pass is full: the edge shortens its next draft to ``gamma / load`` (at least 1 token), so
more sessions fit one pass and queues stop growing; at or above ``WAIT_LOAD`` it also waits a
little before drafting, bounded by ``MAX_WAIT_S``. Output is unchanged (exactness does not
depend on gamma); only throughput and queue lengths are.

A tenant over its draft-token rate gets, per held draft, a non-fatal ``tenant_limit`` notice (the
draft is verified once the tenant's bucket has its tokens). Each notice halves the edge's next
drafts (at least 1 token): under a token budget, short drafts commit more tokens per drafted
token, as fewer are rejected. Without a notice for ``THROTTLE_HOLD_S`` the configured gamma
comes back.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

WAIT_LOAD = 2.0
"""From this load on the edge also pauses before its next draft."""
MAX_WAIT_S = 0.5
THROTTLE_HOLD_S = 5.0
"""How long shortened drafts last after the last rate-limit notice."""
MAX_CUT = 64


@dataclass
class Backpressure:
    load: float = 0.0  # the last verdict's pool_load
    cut: int = 1  # divisor of gamma from rate-limit notices
    throttled_at: float = 0.0  # monotonic time of the last notice
    retry_after_s: float = 0.0  # the last notice's expected wait

    def observe(self, pool_load: float) -> None:
        self.load = max(0.0, pool_load)

    def throttle(self, retry_after_s: float, now: float | None = None) -> None:
        """A draft of this session waits for its tenant's draft-token rate."""
        self.cut = min(MAX_CUT, 2 * self.cut)
        self.throttled_at = time.monotonic() if now is None else now
        self.retry_after_s = max(0.0, retry_after_s)

    def gamma(self, configured: int, now: float | None = None) -> int:
        """The draft length to use now."""
        now = time.monotonic() if now is None else now
        if self.cut > 1 and now - self.throttled_at > THROTTLE_HOLD_S:
            self.cut = 1
        gamma = configured if self.load < 1.0 else int(configured / self.load)
        return max(1, gamma // self.cut) if configured > 1 else configured

    def wait_s(self) -> float:
        if self.load < WAIT_LOAD:
            return 0.0
        return min(MAX_WAIT_S, 0.05 * (self.load - 1.0))

    async def before_round(self, configured: int) -> int:
        """Wait when the pool is saturated, then return the gamma for this round."""
        delay = self.wait_s()
        if delay:
            await asyncio.sleep(delay)
        return self.gamma(configured)
