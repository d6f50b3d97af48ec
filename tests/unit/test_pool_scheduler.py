"""Pool decisions without Redis: DRR fairness, admission, spreading, backpressure, draft-rate holds."""

from __future__ import annotations

import statistics

import numpy as np

from common.wire import DraftBatch, SamplingSpec, SessionOpen
from edge_worker.backpressure import THROTTLE_HOLD_S, Backpressure
from verifier_worker.capacity import load_figure, plan_admission, should_pass_on
from verifier_worker.scheduler import DrrScheduler
from verifier_worker.session import PendingDraft, VerifierSession
from verifier_worker.tenants import RETELL_S, DraftThrottle


def queues(a: int, b: int, cost: int = 5) -> dict[str, list[tuple[str, int]]]:
    return {"A": [(f"a{i}", cost) for i in range(a)], "B": [(f"b{i}", cost) for i in range(b)]}


def test_flooding_tenant_cannot_take_the_other_tenants_slots() -> None:
    scheduler = DrrScheduler()
    for _ in range(50):  # A has 10x B's sessions; the budget fits 6 of the 22 ready drafts
        chosen = scheduler.select(queues(20, 2), max_sessions=6, max_tokens=1000)
        assert {"b0", "b1"} <= set(chosen) and len(chosen) == 6


def test_token_budget_is_shared_equally_when_both_are_backlogged() -> None:
    scheduler = DrrScheduler()
    served = {"A": 0, "B": 0}
    for _ in range(100):
        for key in scheduler.select(queues(40, 40, cost=7), max_sessions=64, max_tokens=60):
            served[key[0].upper()] += 7
    assert abs(served["A"] - served["B"]) <= 2 * 60  # equal shares up to one batch


def test_weights_split_a_binding_budget() -> None:
    scheduler = DrrScheduler()
    served = {"A": 0, "B": 0}
    for _ in range(200):
        chosen = scheduler.select(queues(40, 40), max_sessions=6, max_tokens=30, weights={"A": 2, "B": 1})
        for key in chosen:
            served[key[0].upper()] += 1
    assert 1.8 < served["A"] / served["B"] < 2.2


def test_round_latency_of_the_small_tenant_in_batches() -> None:
    """Simulate rounds: a session's next draft is ready once its previous one was verified."""
    def b_latencies(a_sessions: int) -> list[int]:
        scheduler, waiting = DrrScheduler(), {f"a{i}": 0 for i in range(a_sessions)} | {"b0": 0, "b1": 0}
        latencies = []
        for _ in range(60):
            ready = {t.upper(): [(k, 5) for k in waiting if k[0] == t] for t in "ab"}
            chosen = set(scheduler.select(ready, max_sessions=6, max_tokens=1000))
            for key in waiting:
                waiting[key] += 1
            latencies += [waiting[k] for k in chosen if k[0] == "b"]
            for key in chosen:
                waiting[key] = 0
        return latencies

    alone, crowded = statistics.median(b_latencies(0)), statistics.median(b_latencies(20))
    assert crowded / alone <= 1.5  # in batches: B is in every pass however many A sessions wait


def test_an_oversized_draft_is_still_verified_alone() -> None:
    chosen = DrrScheduler().select({"A": [("big", 500), ("small", 1)]}, max_sessions=8, max_tokens=100)
    assert chosen == ["big"]
    assert DrrScheduler().select({}, 8, 100) == []


def session(sid: str, prompt: int, max_new: int, tenant: str = "t") -> VerifierSession:
    return VerifierSession.from_open(SessionOpen(sid, np.arange(prompt, dtype=np.uint32),
                                                 SamplingSpec(max_new_tokens=max_new), "d", "f", tenant))


def test_admission_evicts_idle_sessions_first_and_refuses_when_nothing_is_idle() -> None:
    busy, idle = session("busy", 10, 10), session("idle", 10, 10)
    assert busy.reserve == 10 + 16  # no blocks yet: its first pass, prompt and largest draft
    busy.last_active, idle.last_active = 100.0, 50.0
    assert plan_admission([busy, idle], 40, 100, now=101.0, idle_s=30.0) == []
    assert plan_admission([busy, idle], 50, 100, now=101.0, idle_s=30.0) == [idle]
    assert plan_admission([busy, idle], 50, 100, now=60.0, idle_s=30.0) is None
    idle.evicted = True  # evicted sessions reserve nothing
    assert plan_admission([busy, idle], 60, 100, now=60.0, idle_s=30.0) == []


def test_spreading_passes_opens_to_clearly_less_loaded_peers_only() -> None:
    peers = {"w2": {"sessions": 1}, "w3": {"sessions": 4}}
    assert should_pass_on(4, peers, hops=0, max_hops=3, slack=2)
    assert not should_pass_on(3, peers, hops=0, max_hops=3, slack=2)
    assert not should_pass_on(9, peers, hops=3, max_hops=3, slack=2)  # hop bound: take it
    assert not should_pass_on(9, {}, hops=0, max_hops=3, slack=2)
    assert not should_pass_on(9, {"w2": {"sessions": 0, "accepting": False}}, 0, 3, 2)


def test_backpressure_shortens_gamma_and_waits_when_saturated() -> None:
    pressure = Backpressure()
    assert pressure.gamma(6) == 6 and pressure.wait_s() == 0
    pressure.observe(0.9)
    assert pressure.gamma(6) == 6
    pressure.observe(2.0)
    assert pressure.gamma(6) == 3 and 0 < pressure.wait_s() <= 0.5
    pressure.observe(100.0)
    assert pressure.gamma(6) == 1 and pressure.wait_s() == 0.5
    assert load_figure(50, 1, 0, 100, 64, 1000) == 0.5
    assert load_figure(10, 128, 0, 100, 64, 1000) == 2.0


def test_rate_limit_notices_halve_gamma_until_a_quiet_spell() -> None:
    pressure = Backpressure()
    pressure.throttle(0.2, now=10.0)
    assert pressure.gamma(8, now=10.0) == 4 and pressure.retry_after_s == 0.2
    pressure.throttle(0.1, now=11.0)
    assert pressure.gamma(8, now=11.0) == 2 and pressure.gamma(1, now=11.0) == 1
    pressure.observe(2.0)  # both kinds of pressure together
    assert pressure.gamma(8, now=11.0) == 1 and pressure.gamma(16, now=11.0) == 2
    pressure.observe(0.0)
    assert pressure.gamma(8, now=11.0 + THROTTLE_HOLD_S + 0.1) == 8  # the configured gamma is back


def queued(sid: str, tenant: str, entry_id: str, gamma: int) -> VerifierSession:
    s = session(sid, 4, 8, tenant)
    s.queue.append(PendingDraft(entry_id, DraftBatch(sid, 0, 4, np.arange(gamma, dtype=np.uint32),
                                                     np.zeros(0, np.uint16), np.zeros(0, np.uint32),
                                                     np.zeros(0, np.float32)), 0.0))
    return s


def test_draft_throttle_keeps_paid_drafts_paid_and_holds_tenants_until_their_estimate() -> None:
    throttle = DraftThrottle()
    a, free = queued("a", "A", "1-0", 4), queued("z", "A", "2-0", 0)
    assert not throttle.is_paid(a) and throttle.is_paid(free)  # an empty draft costs nothing
    throttle.pay(a)
    assert throttle.is_paid(a) and throttle.is_paid(a)  # a retried pass does not pay again
    head = a.queue.popleft()  # verified; the session's next draft arrives
    a.queue.append(PendingDraft("3-0", head.draft, 0.0))
    assert not throttle.is_paid(a)  # the next draft is paid for on its own
    throttle.hold("A", until=5.0)
    assert throttle.held("A", now=4.9) and not throttle.held("A", now=5.0) and not throttle.held("B", 0.0)
    assert throttle.next_release(now=4.0) == 1.0 and throttle.next_release(now=6.0) is None
    assert throttle.should_tell(a, now=4.0) and not throttle.should_tell(a, now=4.0 + RETELL_S - 0.1)
    assert throttle.should_tell(a, now=4.0 + RETELL_S)  # a long hold is told again
    throttle.prune(live=[], now=6.0)
    assert throttle.paid == {} and throttle.told == {} and throttle.held_until == {}
