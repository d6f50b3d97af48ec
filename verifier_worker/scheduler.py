"""Fair batch selection across tenants: deficit round-robin (DRR) by tokens.

When the ready drafts of all sessions fit the batch budget (``max_batch_sessions`` and
``max_batch_tokens``) every one of them is verified and fairness is moot. When the budget binds,
each tenant with ready work gets a quantum of tokens per round (the largest head draft's cost
times the tenant's weight) and takes its oldest drafts while its deficit covers them; unused deficit carries
over to the next batch (classic DRR), so a tenant with 10x more sessions cannot take more than its
share of a pass, and a tenant with one large draft still gets it verified eventually. The
scheduler is pure (no clock, no Redis), so its decisions are unit-tested deterministically.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass
class _Cursor(Generic[K]):
    items: Sequence[tuple[K, int]]
    next: int = 0

    def head_cost(self) -> int:
        return self.items[self.next][1]

    def done(self) -> bool:
        return self.next >= len(self.items)


@dataclass
class DrrScheduler:
    """Keeps each tenant's deficit between batches; ``select`` picks one batch."""

    deficit: dict[str, int] = field(default_factory=dict)
    _rotation: int = 0

    def select(self, queues: Mapping[str, Sequence[tuple[K, int]]], max_sessions: int, max_tokens: int,
               weights: Mapping[str, int] | None = None) -> list[K]:
        """Items to verify now, each tenant's queue given oldest first as ``(key, token cost)``.

        The first item is always taken, even when alone it exceeds ``max_tokens`` (a long prompt
        must still be prefilled).
        """
        active = [t for t in sorted(queues) if queues[t]]
        for tenant in list(self.deficit):
            if tenant not in active:
                del self.deficit[tenant]  # an idle tenant does not bank credit
        if not active:
            return []
        start = self._rotation % len(active)
        self._rotation += 1
        order = active[start:] + active[:start]
        cursors = {t: _Cursor(queues[t]) for t in order}
        # A quantum of one (largest) head draft per round: whichever budget binds, sessions or
        # tokens, the tenants' shares interleave instead of going out in large chunks.
        quantum = max(1, max(cursors[t].head_cost() for t in order))
        batch = _Batch[K](max_sessions, max_tokens)
        while order and not batch.full():
            for tenant in list(order):
                self.deficit[tenant] = self.deficit.get(tenant, 0) + quantum * (weights or {}).get(tenant, 1)
                self._serve(tenant, cursors[tenant], batch)
                cursor = cursors[tenant]
                if cursor.done() or batch.tokens + cursor.head_cost() > max_tokens:
                    order.remove(tenant)  # nothing more of this tenant fits this batch
        for tenant, cursor in cursors.items():
            if cursor.done():
                self.deficit.pop(tenant, None)
            else:
                self.deficit[tenant] = min(self.deficit.get(tenant, 0), max_tokens)
        return batch.taken

    def _serve(self, tenant: str, cursor: _Cursor[K], batch: _Batch[K]) -> None:
        """Take the tenant's oldest drafts while its deficit and the batch budget allow."""
        while not cursor.done() and len(batch.taken) < batch.max_sessions:
            cost = cursor.head_cost()
            if not batch.fits(cost) or (cost > self.deficit[tenant] and batch.taken):
                return
            batch.taken.append(cursor.items[cursor.next][0])
            batch.tokens += cost
            cursor.next += 1
            self.deficit[tenant] = max(0, self.deficit[tenant] - cost)


@dataclass
class _Batch(Generic[K]):
    max_sessions: int
    max_tokens: int
    taken: list[K] = field(default_factory=list)
    tokens: int = 0

    def fits(self, cost: int) -> bool:
        """The first item always fits: a long prompt must still be prefilled."""
        return self.tokens + cost <= self.max_tokens or not self.taken

    def full(self) -> bool:
        return len(self.taken) >= self.max_sessions or self.tokens >= self.max_tokens
