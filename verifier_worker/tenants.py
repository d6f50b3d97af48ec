"""One verifier's side of the tenants' draft-token rate limits: which queued drafts are paid for.

The limit itself is a token bucket per tenant in Redis, shared by the pool
(``broker.pool.PoolBroker.take_draft_tokens``). A draft of a rate-limited tenant is verified only
once its tokens were taken from that bucket ("paid"); until then it stays in its session's queue,
unacknowledged, and the batch is chosen among the other drafts. A tenant whose bucket came up
short is not asked again before the bucket's own estimate of when the next draft fits: one
Redis call per tenant per retry, not per iteration. A paid draft stays paid however often its pass
is retried, so a retry never takes tokens twice. Pure bookkeeping (no clock, no Redis): the worker
passes the time in, so the rules are unit-testable.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from verifier_worker.session import VerifierSession

BURST_S = 1.0
"""The bucket holds this many seconds of a tenant's rate: the largest burst after a quiet spell."""
RETELL_S = 10.0
"""A draft held this long since its edge was last told is told again (the edge's verdict timeout
starts anew with each notice, so a long hold never looks like a dead verifier)."""


@dataclass
class DraftThrottle:
    paid: dict[str, str] = field(default_factory=dict)  # session id -> entry id of its paid head draft
    told: dict[str, tuple[str, float]] = field(default_factory=dict)  # session id -> (entry id, when)
    held_until: dict[str, float] = field(default_factory=dict)  # tenant -> when to ask its bucket again

    def is_paid(self, session: VerifierSession) -> bool:
        """Whether the session's head draft may be verified as far as the rate limit goes."""
        head = session.queue[0]
        return head.draft.gamma == 0 or self.paid.get(session.session_id) == head.entry_id

    def pay(self, session: VerifierSession) -> None:
        self.paid[session.session_id] = session.queue[0].entry_id

    def held(self, tenant: str, now: float) -> bool:
        """Whether the tenant's bucket said "not yet" and its estimate has not passed."""
        return self.held_until.get(tenant, 0.0) > now

    def hold(self, tenant: str, until: float) -> None:
        self.held_until[tenant] = until

    def should_tell(self, session: VerifierSession, now: float) -> bool:
        """Whether to tell the session's edge that its head draft waits: once, then every RETELL_S."""
        entry_id = session.queue[0].entry_id
        last = self.told.get(session.session_id)
        if last is not None and last[0] == entry_id and now - last[1] < RETELL_S:
            return False
        self.told[session.session_id] = (entry_id, now)
        return True

    def next_release(self, now: float) -> float | None:
        """Seconds until the first held tenant may be asked again; None when none is held."""
        waits = [until - now for until in self.held_until.values() if until > now]
        return min(waits) if waits else None

    def prune(self, live: Iterable[str], now: float) -> None:
        """Forget sessions that are gone and holds that have passed."""
        keep = set(live)
        self.paid = {sid: e for sid, e in self.paid.items() if sid in keep}
        self.told = {sid: e for sid, e in self.told.items() if sid in keep}
        self.held_until = {t: until for t, until in self.held_until.items() if until > now}
