"""Prompt lookup and the router, pure: n-gram matching, one-hot q, observation and re-picking."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from common.rejection import FlatRound, verify_round
from common.sampling import SamplingParams
from common.settings import ConfigError, load_settings
from edge_worker.backends.base import DraftBackend, DraftState, Proposal
from edge_worker.backends.policy import RoutePolicy, prompt_class
from edge_worker.backends.prompt_lookup import NO_GUESS, PromptLookupBackend, find_continuation
from edge_worker.backends.router import RouterBackend, build_router

SAMPLED = SamplingParams(temperature=0.8, seed=3)


def test_find_continuation_takes_the_latest_match_of_the_longest_ngram() -> None:
    #         0  1  2  3  4  5  6  7  8  9
    context = [5, 6, 7, 1, 5, 6, 9, 2, 5, 6]
    assert find_continuation(context, 2, max_ngram=2) == [9, 2]  # "5 6" last seen at 4
    assert find_continuation([1, 2, 3, 9, 2, 3, 8, 7, 2, 3], 3, max_ngram=3) == [8, 7, 2]
    assert find_continuation([4, 4, 4], 5) == [4]  # the suffix itself is excluded
    assert find_continuation([1, 2, 3], 4) == []
    assert find_continuation([7], 4) == []
    assert find_continuation([1, 2, 3, 1, 2], 4, max_ngram=3, min_ngram=3) == []


class _Tok:
    eos_token_id = 0

    def decode(self, ids: list[int]) -> str:
        return " ".join(str(i) for i in ids)


def _lookup(fallback: DraftBackend | None = None) -> PromptLookupBackend:
    return PromptLookupBackend(_Tok(), "fp", 50, "tok", frozenset({0}), fallback=fallback)


def test_prompt_lookup_proposal_is_one_hot_when_sampled_and_stops_at_a_stop_token() -> None:
    backend = _lookup()
    state = backend.new_state()
    context = [3, 4, 5, 6, 0, 8, 3, 4]
    greedy = backend.propose(state, context, 4, SamplingParams(), 0, frozenset(), 8)
    assert greedy.token_ids == [5, 6, 0, 8] and greedy.support_sizes == []
    sampled = backend.propose(state, context, 4, SAMPLED, 0, frozenset({0}), 8)
    assert sampled.token_ids == [5, 6, 0]
    assert sampled.support_sizes == [1, 1, 1]
    assert [ids.tolist() for ids in sampled.support_ids] == [[5], [6], [0]]
    assert all(p.tolist() == [1.0] for p in sampled.support_probs)
    assert backend.propose(state, [1, 2, 3], 4, SAMPLED, 0, frozenset(), 8).token_ids == []
    assert backend.guess_next(state, [1, 2, 3]) == NO_GUESS
    assert (state.lookup_rounds, state.empty_rounds) == (2, 1)


def test_one_hot_q_keeps_rejection_sampling_exact() -> None:
    """A deterministic draft with q = 1 on its token: the first output token still follows p."""
    p_values = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    trials, vocab = 100_000, 5
    rng = np.random.default_rng(7)
    # Each trial is one session drafting one token: rows 2b (p after 0 drafts), 2b + 1 (bonus).
    logits = torch.stack([p_values.log(), torch.full((vocab,), 0.2).log()]).repeat(trials, 1)  # [2n, V]
    for drafted in (0, 3, 4):  # a likely, an unlikely and an impossible token
        draft_rows = np.arange(0, 2 * trials, 2)
        draft_ids = np.zeros(2 * trials, np.int64)
        draft_ids[draft_rows] = drafted
        batch = FlatRound(
            offsets=np.arange(0, 2 * trials + 1, 2), draft_ids=draft_ids,
            draft_q=np.ones(2 * trials, np.float32), support_rows=draft_rows,
            support_ids=np.full(trials, drafted, np.int64), support_probs=np.ones(trials, np.float32),
            greedy=np.zeros(trials, bool), temperature=np.ones(trials, np.float32),
            top_k=np.zeros(trials, np.int64), top_p=np.ones(trials, np.float32),
            uniforms=rng.random(2 * trials),
        )
        result = verify_round(logits, batch)
        tokens = torch.where(result.num_accepted > 0, torch.full((trials,), drafted), result.next_token)
        empirical = torch.bincount(tokens, minlength=vocab).double() / trials
        sigma = torch.sqrt(p_values.double() * (1 - p_values.double()) / trials)
        assert torch.all((empirical - p_values.double()).abs() <= 5 * sigma + 1e-9), (drafted, empirical)


class _Scripted(DraftBackend):
    """A fake drafter: proposes ``reference`` continuations (right) or garbage (wrong)."""

    def __init__(self, name: str, reference: list[int], right: bool, cost: float, clock: list[float]) -> None:
        self.name, self.reference, self.right, self.cost, self.clock = name, reference, right, cost, clock
        self.device, self.vocab_size, self.fingerprint = "cpu", 100, "fp"
        self.model_name, self.tokenizer, self.eos_token_ids = name, _Tok(), frozenset({0})

    def new_state(self) -> DraftState:
        return DraftState()

    def propose(self, state: DraftState, context: list[int], gamma: int, params: SamplingParams,
                seq: int, stop_token_ids: frozenset[int], max_support: int,
                cancel: threading.Event | None = None) -> Proposal:
        self.clock[0] += self.cost
        tokens = self.reference[len(context):len(context) + gamma]
        return Proposal(token_ids=tokens if self.right else [99] * len(tokens))


def _session(router: RouterBackend, reference: list[int], prompt_len: int, clock: list[float],
             rounds: int, gamma: int = 4) -> dict:
    """Drive a session like the edge loop: verdicts commit the accepted prefix plus one token."""
    state = router.new_state()
    context = reference[:prompt_len]
    for _ in range(rounds):
        proposal = router.propose(state, context, gamma, SamplingParams(), 0, frozenset(), 8)
        accepted = 0
        for token in proposal.token_ids:
            if token != reference[len(context) + accepted]:
                break
            accepted += 1
        clock[0] += 0.010  # the verification round trip, the same for every drafter
        context = reference[:len(context) + accepted + 1]
    router.release(state)
    return router.reports[-1]


def test_router_recovers_from_a_poor_first_pick_and_reports_it() -> None:
    clock = [0.0]
    reference = list(range(1, 400))
    children = {"bad": _Scripted("bad", reference, False, 0.001, clock),
                "good": _Scripted("good", reference, True, 0.004, clock)}
    router = RouterBackend(children, RoutePolicy(["bad", "good"]), clock=lambda: clock[0])
    report = _session(router, reference, 10, clock, rounds=20)
    assert report["decisions"][0]["drafter"] == "bad"
    assert report["final"] == "good" and report["switches"] >= 1
    good = report["drafters"]["good"]
    assert good["acceptance"] == 1.0 and good["tokens_per_round"] == 5.0
    assert report["drafters"]["bad"]["acceptance"] == 0.0
    # The next session of the same class starts from what the router learned.
    assert _session(router, reference, 10, clock, rounds=3)["decisions"][0]["drafter"] == "good"


def test_router_weighs_draft_cost_against_acceptance() -> None:
    clock = [0.0]
    reference = list(range(1, 400))
    children = {"slow": _Scripted("slow", reference, True, 0.200, clock),
                "fast": _Scripted("fast", reference, True, 0.001, clock)}
    router = RouterBackend(children, RoutePolicy(["slow", "fast"]), clock=lambda: clock[0])
    report = _session(router, reference, 10, clock, rounds=12)
    assert report["final"] == "fast"


def test_router_ignores_a_dropped_draft_ahead() -> None:
    clock = [0.0]
    reference = list(range(1, 100))
    router = RouterBackend({"a": _Scripted("a", reference, True, 0.001, clock)}, clock=lambda: clock[0])
    state = router.new_state()
    first = router.propose(state, reference[:5], 3, SamplingParams(), 0, frozenset(), 8)
    assumed = reference[:5] + first.token_ids + [42]  # drafted ahead with a wrong bonus guess
    router.propose(state, assumed, 3, SamplingParams(), 1, frozenset(), 8, threading.Event())
    assert state.rounds == 0  # the round still in flight is not judged from an assumption
    router.propose(state, reference[:9], 3, SamplingParams(), 1, frozenset(), 8)
    assert state.rounds == 1 and state.stats["a"].accepted == 3 and state.stats["a"].committed == 4


def test_router_refuses_drafters_with_other_vocabularies() -> None:
    from common.models import ModelLoadError

    clock = [0.0]
    other = _Scripted("b", [], True, 0.0, clock)
    other.fingerprint = "other"
    with pytest.raises(ModelLoadError, match="another vocabulary"):
        RouterBackend({"a": _Scripted("a", [], True, 0.0, clock), "b": other})


def test_build_router_shares_a_fallback_model_and_picks_by_domain() -> None:
    clock = [0.0]
    loads = []

    def load_model(backend: str, model: str) -> DraftBackend:
        loads.append((backend, model))
        return _Scripted(model, [], True, 0.0, clock)

    router = build_router(
        [{"name": "code", "model": "m1", "domains": ["code"]},
         {"name": "lookup", "backend": "prompt_lookup", "fallback": "code", "domains": ["long"]}],
        "default", load_model, lambda model, beside: PromptLookupBackend.beside(beside))
    assert loads == [("torch", "m1")]
    assert router.children["lookup"].fallback is router.children["code"]  # type: ignore[attr-defined]
    assert router.policy.first_pick("prose-long", [], {}).arm == "lookup"
    assert router.policy.first_pick("code-short", [], {}).arm == "code"
    assert prompt_class(list(range(300)), None) == "prose-long"


def test_edge_drafts_settings_are_checked() -> None:
    good = load_settings({"edge": {"backend": "router", "drafts": [
        {"name": "d"}, {"name": "l", "backend": "prompt_lookup", "fallback": "d"}]}})
    assert [d.name for d in good.edge.drafts] == ["d", "l"]
    with pytest.raises(ConfigError, match="fallback"):
        load_settings({"edge": {"drafts": [{"name": "l", "backend": "prompt_lookup", "fallback": "x"}]}})
    with pytest.raises(ConfigError, match="unique"):
        load_settings({"edge": {"drafts": [{"name": "d"}, {"name": "d"}]}})


def test_default_drafts_are_the_model_prompt_lookup_and_both() -> None:
    from edge_worker.backends.router import default_drafts

    clock = [0.0]
    router = build_router(default_drafts(), "m",
                          lambda backend, model: _Scripted(model, [], True, 0.0, clock),
                          lambda model, beside: PromptLookupBackend.beside(beside) if beside else _lookup())
    assert list(router.children) == ["draft", "lookup", "lookup+draft"]
    assert router.children["lookup+draft"].fallback is router.children["draft"]  # type: ignore[attr-defined]
    assert router.policy.first_pick("prose-long", [], {}).arm == "lookup"
