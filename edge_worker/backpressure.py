"""Edge-side backpressure: react to the verifier load carried by every verdict.

A verdict's ``pool_load`` is its verifier's utilisation when the draft was batched: the larger
of (ready draft tokens / batch token budget), (ready sessions / batch session budget) and
(reserved KV / KV budget). Below 1 nothing binds and the edge drafts as configured. At or above
1 the pass is full: the edge shortens its next draft to ``gamma / load`` (at least 1 token), so
more sessions fit one pass and queues stop growing; at or above ``WAIT_LOAD`` it also waits a
little before drafting, bounded by ``MAX_WAIT_S``. Output is unchanged (exactness does not
depend on gamma); only throughput and queue lengths are.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

WAIT_LOAD = 2.0
"""From this load on the edge also pauses before its next draft."""
MAX_WAIT_S = 0.5


@dataclass
class Backpressure:
    load: float = 0.0  # the last verdict's pool_load

    def observe(self, pool_load: float) -> None:
        self.load = max(0.0, pool_load)

    def gamma(self, configured: int) -> int:
        """The draft length to use now."""
        if self.load < 1.0 or configured <= 1:
            return configured
        return max(1, int(configured / self.load))

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
