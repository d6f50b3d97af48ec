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
        taken: list[K] = []
        tokens = 0
        while order and len(taken) < max_sessions:
            for tenant in list(order):
                cursor = cursors[tenant]
                self.deficit[tenant] = self.deficit.get(tenant, 0) + quantum * (weights or {}).get(tenant, 1)
                while not cursor.done() and len(taken) < max_sessions:
                    cost = cursor.head_cost()
                    fits = tokens + cost <= max_tokens or not taken
                    if not fits or (cost > self.deficit[tenant] and taken):
                        break
                    taken.append(cursor.items[cursor.next][0])
                    cursor.next += 1
                    tokens += cost
                    self.deficit[tenant] = max(0, self.deficit[tenant] - cost)
                if cursor.done() or tokens + cursor.head_cost() > max_tokens:
                    order.remove(tenant)  # nothing more of this tenant fits this batch
            if len(taken) >= max_sessions or tokens >= max_tokens:
                break
        for tenant, cursor in cursors.items():
            if cursor.done():
                self.deficit.pop(tenant, None)
            else:
                self.deficit[tenant] = min(self.deficit.get(tenant, 0), max_tokens)
        return taken
