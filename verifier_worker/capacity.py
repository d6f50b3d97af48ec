"""Pure pool decisions of one verifier: its load, KV admission, idle eviction, spreading opens.

Kept apart from the worker's Redis plumbing so every rule is unit-testable without a clock or
a server. ``decide_admission`` is the one KV admission rule: the worker executes its decision
(verifier_worker.admission) and ``benchmarks/kv_admission.py`` measures the same function.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sized
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from common.wire import ErrorCode


class Resident(Protocol):
    """What admission reads of a held session (``VerifierSession``; the benchmark's simulation)."""

    @property
    def reserve(self) -> int: ...  # KV tokens it counts against the budget

    @property
    def evicted(self) -> bool: ...  # its cache was dropped: it reserves nothing

    @property
    def queue(self) -> Sized: ...  # drafts waiting: a session with any is never idle

    @property
    def last_active(self) -> float: ...


R = TypeVar("R", bound=Resident)


def resident_tokens(sessions: Iterable[Resident]) -> int:
    """KV tokens reserved by sessions whose cache is resident (evicted ones reserve nothing)."""
    return sum(s.reserve for s in sessions if not s.evicted)


def evictable(sessions: Iterable[R], now: float, idle_s: float) -> list[R]:
    """Resident sessions with no queued draft and no activity for ``idle_s``, idlest first."""
    idle = [s for s in sessions if not s.evicted and not s.queue and now - s.last_active >= idle_s]
    return sorted(idle, key=lambda s: s.last_active)


def plan_admission(sessions: list[R], need: int, budget: int, now: float, idle_s: float) -> list[R] | None:
    """The idle sessions to evict so that ``need`` more tokens fit the budget; None: cannot fit."""
    used = resident_tokens(sessions)
    if used + need <= budget:
        return []
    victims = []
    for session in evictable(sessions, now, idle_s):
        victims.append(session)
        used -= session.reserve
        if used + need <= budget:
            return victims
    return None


# ---------------------------------------------------------------------- the admission decision

@dataclass(frozen=True)
class Take:
    """Admit the session now."""


@dataclass(frozen=True)
class Evict(Generic[R]):
    """Drop these idle sessions' caches (recomputed if they return), then admit the session."""

    victims: tuple[R, ...]


@dataclass(frozen=True)
class PassOn:
    """A live peer holds clearly fewer sessions: hand the open to the pool again, one hop more."""


@dataclass(frozen=True)
class Wait:
    """No KV room yet: the open goes back to the end of its tenant's stream."""


@dataclass(frozen=True)
class Reject:
    """Refuse the open with this typed error."""

    code: ErrorCode
    message: str


Decision = Take | Evict[R] | PassOn | Wait | Reject


@dataclass(frozen=True)
class OpenRequest:
    """One session open as admission sees it."""

    tenant: str
    need: int  # KV tokens of its first pass (prompt and one round's largest draft)
    hops: int = 0  # times it was passed on already
    waited_ms: float = 0.0  # since it was first read
    queued: int = 0  # opens waiting in its tenant's stream


@dataclass(frozen=True)
class AdmissionRules:
    """The settings admission follows (``pool.*``) and the room the arena leaves it."""

    budget: int  # tokens admission may fill: the arena's budget less the growth headroom
    kv_budget_tokens: int = 1 << 62  # pool.kv_budget_tokens: a need above it never fits
    idle_evict_s: float = 30.0
    admission_wait_s: float = 30.0
    max_queued_opens: int = 10000
    max_open_hops: int = 0  # 0: never pass on
    spread_slack: int = 2


def decide_admission(sessions: list[R], request: OpenRequest, rules: AdmissionRules,
                     peers: Mapping[str, Mapping[str, Any]], now: float) -> Decision[R]:
    """What to do with one open: pass it on, take it (evicting idle caches), let it wait, refuse it."""
    if should_pass_on(len(sessions), peers, request.hops, rules.max_open_hops, rules.spread_slack):
        return PassOn()
    victims = plan_admission(sessions, request.need, rules.budget, now, rules.idle_evict_s)
    if victims is not None:
        return Evict(tuple(victims)) if victims else Take()
    if request.need > rules.kv_budget_tokens or request.waited_ms > rules.admission_wait_s * 1000:
        return Reject(ErrorCode.CAPACITY, f"no KV room for {request.need} tokens (budget "
                      f"{rules.kv_budget_tokens} tokens per verifier) within {rules.admission_wait_s}s")
    if request.queued > rules.max_queued_opens:
        return Reject(ErrorCode.BUSY, f"tenant {request.tenant!r} has {request.queued} session opens "
                      f"waiting (limit {rules.max_queued_opens}): open again later")
    return Wait()


# ---------------------------------------------------------------------- triage of a read's opens

@dataclass(frozen=True)
class OpenSeen:
    """One open as triage sees it, before any per-open work (decode, MAC, lease)."""

    age_ms: float  # since it was queued (or first seen), ``admission.open_age_ms``
    edge_seen: bool  # its session's draft stream exists: an edge drafted for it (edges draft first)
    backlog: int  # opens waiting in its tenant's queue (new and deferred; read once per scan interval)


@dataclass(frozen=True)
class TriageRules:
    grace_ms: float  # pool.open_grace_s: how long an open may wait for its edge's first draft
    backlog_at: int  # pool.opens_per_read: a longer tenant queue is a backlog


LIVE, UNSEEN, DROP = "live", "unseen", "drop"


def triage_open(seen: OpenSeen, rules: TriageRules) -> str:
    """Where one read open goes: ``live`` (its edge drafted: admitted first), ``unseen`` (no draft
    yet, young, no backlog: admitted after the live ones) or ``drop`` (acknowledged and deleted,
    no reply: nobody drafted for it, so nobody listens).

    An edge writes its session's first draft before its open, so a live session's open always
    finds its draft stream. An open without one is an idle open (a flood, an edge long gone):
    while its tenant has a backlog it is dropped at once, one pipelined check per read, instead of
    being admitted one at a time ahead of the tenant's live sessions; past the grace it is dropped
    even without a backlog. An edge that was merely slow re-sends its open after its first draft."""
    if seen.edge_seen:
        return LIVE
    if seen.backlog > rules.backlog_at or seen.age_ms > rules.grace_ms:
        return DROP
    return UNSEEN


# ---------------------------------------------------------------------- preemption in a pass

class Holder(Protocol):
    """A cache holding blocks (``SessionKV``), as preemption sees it."""

    @property
    def blocks(self) -> list[int]: ...

    @property
    def last_used(self) -> int: ...  # the arena's pass counter when a pass last fed it


H = TypeVar("H", bound=Holder)


def lru_victims(holders: Iterable[H], blocks: int) -> list[H]:
    """The caches to drop so that ``blocks`` more blocks are free: least recently used first
    (vLLM's recompute preemption; a dropped cache is rebuilt from its context when it returns)."""
    victims = []
    for holder in sorted(holders, key=lambda h: h.last_used):
        if blocks <= 0:
            break
        victims.append(holder)
        blocks -= len(holder.blocks)
    return victims


def should_pass_on(own_sessions: int, peers: Mapping[str, Mapping[str, Any]], hops: int, max_hops: int,
                   slack: int) -> bool:
    """Pass a new session on when a live, accepting peer holds clearly fewer sessions (bounded hops)."""
    counts = [int(load.get("sessions", 0)) for load in peers.values() if load.get("accepting", True)]
    if hops >= max_hops or not counts:
        return False
    return own_sessions > min(counts) + slack


def tenant_sessions(sessions: Iterable[Any]) -> dict[str, int]:
    return dict(Counter(s.tenant for s in sessions))


def load_figure(ready_tokens: int, ready_sessions: int, resident: int, max_tokens: int,
                max_sessions: int, budget: int) -> float:
    """One number for backpressure: >= 1 when the batch or KV budget binds."""
    return round(max(ready_tokens / max_tokens, ready_sessions / max_sessions, resident / budget), 3)
