"""The one KV admission rule (``capacity.decide_admission``) and the preemption policy, by table."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from common.wire import ErrorCode
from verifier_worker.capacity import (
    DROP,
    LIVE,
    UNSEEN,
    AdmissionRules,
    Evict,
    OpenRequest,
    OpenSeen,
    PassOn,
    Reject,
    Take,
    TriageRules,
    Wait,
    decide_admission,
    lru_victims,
    triage_open,
)


@dataclass
class Held:
    name: str
    reserve: int
    last_active: float = 0.0
    queue: tuple[int, ...] = ()
    evicted: bool = False


@dataclass
class Cache:
    name: str
    blocks: list[int] = field(default_factory=list)
    last_used: int = 0


BUSY = Held("busy", 40, last_active=95.0, queue=(1,))  # a queued draft: never evicted
IDLE_OLD = Held("old", 30, last_active=10.0)
IDLE_NEW = Held("new", 20, last_active=50.0)
RECENT = Held("recent", 20, last_active=90.0)  # active within idle_evict_s: not evicted
GONE = Held("gone", 500, evicted=True)  # evicted: reserves nothing
RULES = AdmissionRules(budget=100, kv_budget_tokens=140, idle_evict_s=30.0, admission_wait_s=5.0,
                       max_queued_opens=10, max_open_hops=2, spread_slack=1)
IDLE_PEER = {"p": {"sessions": 0, "accepting": True}}
DRAINING_PEER = {"p": {"sessions": 0, "accepting": False}}

CASES = [
    # (why, sessions, request, peers, decision)
    ("room left", [BUSY], OpenRequest("t", 60), {}, Take()),
    ("evicted sessions reserve nothing", [BUSY, GONE], OpenRequest("t", 60), {}, Take()),
    ("the idlest goes first", [BUSY, IDLE_NEW, IDLE_OLD], OpenRequest("t", 30), {}, Evict((IDLE_OLD,))),
    ("as many idle as it takes", [BUSY, IDLE_NEW, IDLE_OLD], OpenRequest("t", 60), {},
     Evict((IDLE_OLD, IDLE_NEW))),
    ("recently active: wait", [BUSY, RECENT, IDLE_NEW], OpenRequest("t", 70), {}, Wait()),
    ("waited too long", [BUSY, RECENT], OpenRequest("t", 60, waited_ms=5001), {},
     Reject(ErrorCode.CAPACITY, "no KV room for 60 tokens (budget 140 tokens per verifier) within 5.0s")),
    ("can never fit", [], OpenRequest("t", 141), {},
     Reject(ErrorCode.CAPACITY, "no KV room for 141 tokens (budget 140 tokens per verifier) within 5.0s")),
    ("its tenant's queue is full", [BUSY, RECENT], OpenRequest("t", 60, queued=11), {},
     Reject(ErrorCode.BUSY, "tenant 't' has 11 session opens waiting (limit 10): open again later")),
    ("a peer holds clearly fewer", [BUSY, RECENT], OpenRequest("t", 10), IDLE_PEER, PassOn()),
    ("within the slack", [BUSY], OpenRequest("t", 10), IDLE_PEER, Take()),
    ("hops used up", [BUSY, RECENT], OpenRequest("t", 10, hops=2), IDLE_PEER, Take()),
    ("a draining peer takes nothing", [BUSY, RECENT], OpenRequest("t", 10), DRAINING_PEER, Take()),
]


@pytest.mark.parametrize(("why", "sessions", "request_", "peers", "decision"), CASES,
                         ids=[case[0] for case in CASES])
def test_admission_decision(why, sessions, request_, peers, decision) -> None:
    assert decide_admission(sessions, request_, RULES, peers, now=100.0) == decision


def test_preemption_drops_least_recently_used_until_enough_blocks() -> None:
    a, b, c = Cache("a", [1, 2], last_used=3), Cache("b", [3], last_used=1), Cache("c", [4, 5], last_used=2)
    assert lru_victims([a, b, c], 0) == []
    assert lru_victims([a, b, c], 1) == [b]
    assert lru_victims([a, b, c], 2) == [b, c]
    assert lru_victims([a, b, c], 9) == [b, c, a]


TRIAGE = TriageRules(grace_ms=10_000, backlog_at=16)
TRIAGE_CASES = [
    # (why, seen, where)
    ("its edge drafted", OpenSeen(age_ms=0, edge_seen=True, backlog=0), LIVE),
    ("its edge drafted, however long the backlog", OpenSeen(age_ms=0, edge_seen=True, backlog=50_000), LIVE),
    ("its edge drafted, however old", OpenSeen(age_ms=3_600_000, edge_seen=True, backlog=0), LIVE),
    ("no draft yet, young, no backlog", OpenSeen(age_ms=500, edge_seen=False, backlog=3), UNSEEN),
    ("no draft, the queue is one read long", OpenSeen(age_ms=0, edge_seen=False, backlog=16), UNSEEN),
    ("no draft while the tenant has a backlog", OpenSeen(age_ms=0, edge_seen=False, backlog=17), DROP),
    ("no draft past the grace", OpenSeen(age_ms=10_001, edge_seen=False, backlog=0), DROP),
    ("no draft at the grace", OpenSeen(age_ms=10_000, edge_seen=False, backlog=0), UNSEEN),
]


@pytest.mark.parametrize(("why", "seen", "where"), TRIAGE_CASES, ids=[case[0] for case in TRIAGE_CASES])
def test_open_triage(why, seen, where) -> None:
    assert triage_open(seen, TRIAGE) == where
