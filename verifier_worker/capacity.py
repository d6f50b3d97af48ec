"""Pure pool decisions of one verifier: its load, KV admission, idle eviction, spreading opens.

Kept apart from the worker's Redis plumbing so every rule is unit-testable without a clock or
a server.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from verifier_worker.session import VerifierSession


def resident_tokens(sessions: Iterable[VerifierSession]) -> int:
    """KV tokens reserved by sessions whose cache is resident (evicted ones reserve nothing)."""
    return sum(s.reserve for s in sessions if not s.evicted)


def evictable(sessions: Iterable[VerifierSession], now: float, idle_s: float) -> list[VerifierSession]:
    """Resident sessions with no queued draft and no activity for ``idle_s``, idlest first."""
    idle = [s for s in sessions if not s.evicted and not s.queue and now - s.last_active >= idle_s]
    return sorted(idle, key=lambda s: s.last_active)


def plan_admission(sessions: list[VerifierSession], need: int, budget: int, now: float,
                   idle_s: float) -> list[VerifierSession] | None:
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


def should_pass_on(own_sessions: int, peers: Mapping[str, Mapping[str, Any]], hops: int, max_hops: int,
                   slack: int) -> bool:
    """Pass a new session on when a live, accepting peer holds clearly fewer sessions (bounded hops)."""
    counts = [int(load.get("sessions", 0)) for load in peers.values() if load.get("accepting", True)]
    if hops >= max_hops or not counts:
        return False
    return own_sessions > min(counts) + slack


def tenant_sessions(sessions: Iterable[VerifierSession]) -> dict[str, int]:
    return dict(Counter(s.tenant for s in sessions))


def load_figure(ready_tokens: int, ready_sessions: int, resident: int, max_tokens: int,
                max_sessions: int, budget: int) -> float:
    """One number for backpressure: >= 1 when the batch or KV budget binds."""
    return round(max(ready_tokens / max_tokens, ready_sessions / max_sessions, resident / budget), 3)
