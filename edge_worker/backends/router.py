"""The router: a draft backend that picks one of several drafters per session, and re-picks.

Several drafts sharing the target's vocabulary (``edge.drafts``: model drafts, prompt lookup,
both) each suit some prompts. The router is itself a ``DraftBackend``, so the edge session loop
is unchanged: each session gets a ``RouterState`` holding one child state per drafter, and every
``propose`` is delegated to the session's current pick.

What it observes needs no hook either. The context of the next proposal tells how the last one
fared: the tokens that match the previous proposal were accepted, one more was the target's
own. The time between the two proposals is the round's wall time (drafting, transport,
verification), the time inside the drafter its draft cost. A drafter is judged by expected
committed tokens per second of wall time: its tokens per round over its draft cost plus the
rest of a round (shared by all drafters, see policy.py), so a cheap drafter with middling
acceptance can beat a good but slow one, as it does in the session.
(With drafting ahead, a proposal made for an assumed context only judges the rounds before the
one still in flight; a proposal drafted ahead and dropped is forgotten.)

Choice (``policy.py``): at session start, from the prompt's class (code or prose, short or long)
and what this process learned about that class in earlier sessions; with no history, the
drafter whose declared domains fit, else prompt lookup for long prompts, else the first entry.
During the session, after every round, a simple bandit (every drafter is tried once per class,
then the best estimate is followed, with hysteresis; the session's own rounds on top of the
class prior) switches when another drafter's estimate beats the current one's, so a poor first
pick recovers. The output never depends on the choice: every proposal is verified.

Every decision is one structlog line (``edge.router.pick``: route id, round, drafter, reason,
estimates); ``release`` logs ``edge.router.session`` with the per-drafter figures and keeps the
report in ``RouterBackend.reports``.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common.logs import get_logger
from common.models import ModelLoadError
from common.sampling import SamplingParams
from edge_worker.backends.base import DraftBackend, DraftState, Proposal, cut_options
from edge_worker.backends.policy import ArmStats, Decision, RoutePolicy, prompt_class

log = get_logger("specd.edge.router")
REPORTS_KEPT = 1000


@dataclass
class _Record:
    """One proposal sent (as far as the router knows): where it started and what it said."""

    start: int
    tokens: list[int]
    arm: str
    began: float  # perf_counter when the proposal was asked for
    ahead: bool
    draft_s: float = 0.0  # time spent inside the drafter


@dataclass
class RouterState(DraftState):
    route_id: int
    prompt_len: int = 0
    klass: str = ""
    arm: str = ""
    children: dict[str, DraftState] = field(default_factory=dict)
    records: list[_Record] = field(default_factory=list)
    stats: dict[str, ArmStats] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    rounds: int = 0


class RouterBackend(DraftBackend):
    """Delegates each session to one of ``children`` (name -> backend), re-picked per round."""

    name = "router"

    def __init__(self, children: dict[str, DraftBackend], policy: RoutePolicy | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if not children:
            raise ModelLoadError("the router needs at least one draft (edge.drafts)")
        first = next(iter(children.values()))
        for name, child in children.items():
            if child.fingerprint != first.fingerprint:
                raise ModelLoadError(
                    f"edge.drafts: {name!r} ({child.model_name}) has another vocabulary "
                    f"({child.fingerprint}) than {first.model_name} ({first.fingerprint}); every "
                    f"draft the router picks from must share the target's tokenizer")
        self.children = dict(children)
        self.policy = policy or RoutePolicy(list(children), {n: c.name for n, c in children.items()})
        self.tokenizer = first.tokenizer
        self.fingerprint = first.fingerprint
        self.vocab_size = max(c.vocab_size for c in children.values())
        self.eos_token_ids = frozenset().union(*(c.eos_token_ids for c in children.values()))
        self.device = ",".join(sorted({c.device for c in children.values()}))
        self.model_name = "router(" + ",".join(f"{n}={c.model_name}" for n, c in children.items()) + ")"
        self.wants_features = any(c.wants_features for c in children.values())
        self.clock = clock
        self.reports: deque[dict[str, Any]] = deque(maxlen=REPORTS_KEPT)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # the policy's class history is shared by sessions

    def new_state(self) -> RouterState:
        return RouterState(route_id=next(self._ids),
                           stats={name: ArmStats() for name in self.children})

    def propose(self, state: DraftState, context: list[int], gamma: int, params: SamplingParams,
                seq: int, stop_token_ids: frozenset[int], max_support: int,
                cancel: threading.Event | None = None, *, min_confidence: float = 0.0,
                open_confidence: float = 0.0) -> Proposal:
        assert isinstance(state, RouterState)
        now = self.clock()
        ahead = cancel is not None
        if not state.arm:
            self._start(state, context)
        else:
            self._observe(state, context, now, ahead)
            self._repick(state)
        arm = state.arm
        began = self.clock()
        child = self.children[arm]
        proposal = child.propose(self._child_state(state, arm), context, gamma, params, seq,
                                 stop_token_ids, max_support, cancel, **cut_options(child, min_confidence,
                                                                       open_confidence))
        state.records.append(_Record(len(context), list(proposal.token_ids), arm, now, ahead,
                                     self.clock() - began))
        return proposal

    def observe(self, state: DraftState, feature: bytes, committed: int) -> None:
        """Every feature draft of the session sees each feature (a switch finds it current)."""
        assert isinstance(state, RouterState)
        for name, child in self.children.items():
            if child.wants_features:
                child.observe(self._child_state(state, name), feature, committed)

    def guess_next(self, state: DraftState, context: list[int]) -> int:
        """The current pick's guess; observing waits for the proposal that follows."""
        assert isinstance(state, RouterState)
        arm = state.arm or next(iter(self.children))
        return self.children[arm].guess_next(self._child_state(state, arm), context)

    def release(self, state: DraftState) -> None:
        assert isinstance(state, RouterState)
        for name, child_state in state.children.items():
            self.children[name].release(child_state)
        report = self.session_report(state)
        self.reports.append(report)
        log.info("edge.router.session", **report)

    def session_report(self, state: RouterState) -> dict[str, Any]:
        """Per-drafter rounds, acceptance and rate for one session, and every decision."""
        return {
            "route_id": state.route_id, "prompt_class": state.klass, "prompt_tokens": state.prompt_len,
            "rounds": state.rounds, "final": state.arm,
            "switches": max(0, len(state.decisions) - 1),
            "drafters": {name: s.summary() for name, s in state.stats.items() if s.rounds},
            "decisions": [d.as_dict() for d in state.decisions],
        }

    def _child_state(self, state: RouterState, arm: str) -> DraftState:
        if arm not in state.children:
            state.children[arm] = self.children[arm].new_state()
        return state.children[arm]

    def _start(self, state: RouterState, context: list[int]) -> None:
        state.prompt_len = len(context)
        state.klass = prompt_class(context, self.tokenizer)
        with self._lock:
            decision = self.policy.first_pick(state.klass, context, state.stats)
        self._decide(state, decision)

    def _observe(self, state: RouterState, context: list[int], now: float, ahead: bool) -> None:
        """Judge the rounds this context settles (see the module doc); forget dropped drafts."""
        state.records = [r for r in state.records if r.start < len(context)]
        settled = state.records[:-1] if ahead else state.records
        for record in settled:
            arm_stats = state.stats[record.arm]
            accepted = _matching(record.tokens, context[record.start:])
            committed = min(accepted + 1, len(context) - record.start)
            arm_stats.observe(len(record.tokens), accepted, committed, now - record.began, record.draft_s)
            state.rounds += 1
            with self._lock:
                self.policy.learn(state.klass, record.arm, committed, now - record.began, record.draft_s)
        state.records = state.records[len(settled):]

    def _repick(self, state: RouterState) -> None:
        with self._lock:
            decision = self.policy.repick(state.klass, state.arm, state.stats, state.rounds)
        if decision is not None:
            self._decide(state, decision)

    def _decide(self, state: RouterState, decision: Decision) -> None:
        state.arm = decision.arm
        state.decisions.append(decision)
        log.info("edge.router.pick", route_id=state.route_id, prompt_class=state.klass, **decision.as_dict())


def _matching(drafted: list[int], committed: list[int]) -> int:
    count = 0
    for a, b in zip(drafted, committed, strict=False):
        if a != b:
            break
        count += 1
    return count


def default_drafts() -> list[dict[str, Any]]:
    """``edge.drafts`` when empty: models.draft, prompt lookup, and prompt lookup beside it."""
    return [{"name": "draft", "backend": "torch"},
            {"name": "lookup", "backend": "prompt_lookup", "domains": ["long"]},
            {"name": "lookup+draft", "backend": "prompt_lookup", "fallback": "draft"}]


def build_router(specs: list[dict[str, Any]], default_model: str, load_model: Any,
                 load_lookup: Any) -> RouterBackend:
    """Build each named drafter once (``load_model(backend, model)``, ``load_lookup(model, fallback)``).

    A prompt-lookup entry with a fallback reuses that entry's loaded model (one copy of the
    weights, a state per use).
    """
    loaded: dict[str, DraftBackend] = {}
    domains: dict[str, list[str]] = {}
    for spec in specs:
        backend = spec.get("backend", "torch")
        if backend != "prompt_lookup":
            loaded[spec["name"]] = load_model(backend, spec.get("model") or default_model)
    children: dict[str, DraftBackend] = {}
    for spec in specs:
        name = spec["name"]
        domains[name] = list(spec.get("domains") or [])
        if name in loaded:
            children[name] = loaded[name]
            continue
        fallback = loaded.get(spec.get("fallback") or "")
        children[name] = load_lookup(spec.get("model") or default_model, fallback)
    policy = RoutePolicy(list(children), {n: c.name for n, c in children.items()}, domains)
    return RouterBackend(children, policy)
