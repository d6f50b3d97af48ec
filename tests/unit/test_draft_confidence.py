"""Ending a round's drafting on the draft's own low confidence (``edge.draft_confidence``).

A scripted backend gives known logits per drafted position, so the rule is checked without a
model: the round ends after the first token below the threshold (that token is still sent), and
never earlier than the other rules (gamma, a stop token) would end it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.sampling import SamplingParams
from edge_worker.backends.base import IncrementalBackend, IncrementalState, Proposal, confident

VOCAB = 8


def peaked(token: int, probability: float) -> torch.Tensor:
    """Logits whose softmax gives ``token`` exactly ``probability`` (the rest spread evenly)."""
    rest = (1.0 - probability) / (VOCAB - 1)
    probs = torch.full((VOCAB,), rest, dtype=torch.float64)
    probs[token] = probability
    return probs.log().float()


class Scripted(IncrementalBackend):
    """Position i of a round (counted from the context) has ``script[i]`` as its distribution."""

    name = "scripted"
    device = "cpu"
    vocab_size = VOCAB
    fingerprint = ""
    model_name = "scripted"
    tokenizer = None
    eos_token_ids = frozenset({0})

    def __init__(self, script: list[tuple[int, float]], context: int) -> None:
        self.script, self.context = script, context

    def new_state(self) -> IncrementalState:
        return IncrementalState()

    def _truncate(self, state: IncrementalState, keep: int) -> None:
        pass

    def _feed(self, state: IncrementalState, tokens: list[int]) -> torch.Tensor:
        state.tokens.extend(tokens)
        return peaked(*self.script[len(state.tokens) - self.context])


# drafted position: (the draft's top token, its probability)
SCRIPT = [(5, 0.9), (6, 0.7), (7, 0.3), (5, 0.9), (6, 0.9)]


@pytest.mark.parametrize(("threshold", "drafted"), [
    (0.0, [5, 6, 7, 5]),  # off: gamma decides
    (0.5, [5, 6, 7]),  # 7 is below 0.5: sent, then the round ends
    (0.8, [5, 6]),
    (0.95, [5]),  # at least one token is always drafted
])
def test_greedy_drafting_ends_after_the_first_unsure_token(threshold: float, drafted: list[int]) -> None:
    backend = Scripted(SCRIPT, context=3)
    proposal = backend.propose(backend.new_state(), [1, 2, 3], 4, SamplingParams(), 0, frozenset(), 8,
                               min_confidence=threshold)
    assert proposal.token_ids == drafted


def test_a_stop_token_or_gamma_still_ends_the_round_first() -> None:
    backend = Scripted(SCRIPT, context=3)
    short = backend.propose(backend.new_state(), [1, 2, 3], 2, SamplingParams(), 0, frozenset(), 8,
                            min_confidence=0.5)
    assert short.token_ids == [5, 6]
    stopped = backend.propose(backend.new_state(), [1, 2, 3], 4, SamplingParams(), 0, frozenset({6}), 8,
                              min_confidence=0.5)
    assert stopped.token_ids == [5, 6]


def test_sampled_confidence_is_the_probability_the_draft_sends() -> None:
    """Sampling judges the sampled token by the sparse distribution sent with it (what the
    verifier's rejection test uses), so the cut depends only on the draft's own numbers."""
    proposal = Proposal(token_ids=[4], support_sizes=[2], support_ids=[np.array([4, 1], np.uint32)],
                        support_probs=[np.array([0.25, 0.75], np.float32)])
    logits = peaked(1, 0.75)
    assert confident(logits, 4, proposal, 0.2)
    assert not confident(logits, 4, proposal, 0.3)
    assert confident(logits, 4, proposal, 0.0)


def test_sampled_rounds_stop_on_a_low_probability_sample() -> None:
    backend = Scripted([(5, 0.2)] * 5, context=3)  # every position is unsure
    params = SamplingParams(temperature=1.0, seed=3)
    proposal = backend.propose(backend.new_state(), [1, 2, 3], 4, params, 0, frozenset(), 8,
                               min_confidence=0.9)
    assert len(proposal.token_ids) == 1 and proposal.support_sizes


def test_the_cut_defaults_to_what_the_draft_recommends(tmp_path, tiny_pair) -> None:
    """Unset, ``edge.draft_confidence`` is the draft's own ``assistant_confidence_threshold``
    (transformers' field, so its assisted generation cuts the same way); set, it wins."""
    import json
    import shutil

    from common.models import recommended_draft_confidence
    from common.settings import Settings
    from specd.runtime import draft_confidence

    folder = tmp_path / "draft"
    shutil.copytree(tiny_pair["draft"], folder)
    config = folder / "generation_config.json"
    for written, expected in [({"assistant_confidence_threshold": 0.6}, 0.6), ({}, 0.0),
                              ({"assistant_confidence_threshold": 7}, 0.0)]:
        config.write_text(json.dumps(written))
        assert recommended_draft_confidence(str(folder)) == expected
    config.write_text("{not json")
    assert recommended_draft_confidence(str(folder)) == 0.0
    config.write_text(json.dumps({"assistant_confidence_threshold": 0.6}))
    assert draft_confidence(Settings(models={"draft": str(folder)})) == 0.6
    assert draft_confidence(Settings(models={"draft": str(folder)}, edge={"draft_confidence": 0})) == 0.0
    assert draft_confidence(Settings(models={"draft": "bundled:draft"})) == 0.0


def test_a_drafter_written_before_the_cut_still_drafts() -> None:
    """A registered drafter whose ``propose`` has no ``min_confidence`` (the interface before the
    cut) is called without it, whatever the cut; model backends get it."""
    from edge_worker.backends.base import DraftBackend, cut_options

    class Legacy(DraftBackend):
        def new_state(self):  # type: ignore[no-untyped-def]
            return IncrementalState()

        def propose(self, state, context, gamma, params, seq, stop_token_ids, max_support,  # type: ignore[no-untyped-def]
                    cancel=None):
            return Proposal([context[-1]] * gamma)

    assert cut_options(Legacy(), 0.6) == {}
    assert cut_options(Scripted(SCRIPT, 3), 0.6) == {"min_confidence": 0.6}
    assert cut_options(Scripted(SCRIPT, 3), 0.0) == {}


# ---------------------------------------------------------------- the first-token bar


@pytest.mark.parametrize(("bar", "drafted"), [
    (0.0, [5, 6, 7, 5]),  # off
    (0.85, [5, 6, 7, 5]),  # the first token has 0.9: the round drafts as usual
    (0.95, []),  # below the bar: the round is the target's token alone
])
def test_a_round_drafts_nothing_below_the_first_token_bar(bar: float, drafted: list[int]) -> None:
    backend = Scripted(SCRIPT, context=3)
    proposal = backend.propose(backend.new_state(), [1, 2, 3], 4, SamplingParams(), 0, frozenset(), 8,
                               open_confidence=bar)
    assert proposal.token_ids == drafted


def test_the_bar_reads_the_distribution_not_a_sample() -> None:
    """Sampled: whether a round drafts depends on the draft's distribution at the context alone
    (never on which token a draw picks), and a round that drafts is the one drafted without the
    bar, draw for draw, so the verifier's rejection test sees the distributions it always did."""
    unsure = Scripted([(5, 0.4)] * 5, context=3)
    sure = Scripted([(5, 0.9), (6, 0.7), (7, 0.8), (5, 0.9), (6, 0.9)], context=3)
    for seed in range(20):
        params = SamplingParams(temperature=1.0, seed=seed)
        assert unsure.propose(unsure.new_state(), [1, 2, 3], 4, params, 0, frozenset(), 8,
                              open_confidence=0.5).token_ids == []
        barred = sure.propose(sure.new_state(), [1, 2, 3], 4, params, 0, frozenset(), 8, open_confidence=0.5)
        free = sure.propose(sure.new_state(), [1, 2, 3], 4, params, 0, frozenset(), 8)
        assert barred.token_ids == free.token_ids and len(free.token_ids) == 4
        pairs = zip(barred.support_probs, free.support_probs, strict=True)
        assert all(np.array_equal(a, b) for a, b in pairs)


def test_the_bar_defaults_to_what_the_draft_recommends(tmp_path, tiny_pair) -> None:
    import json
    import shutil

    from common.settings import Settings
    from edge_worker.backends.base import cut_options
    from specd.runtime import draft_confidence, edge_config

    folder = tmp_path / "draft"
    shutil.copytree(tiny_pair["draft"], folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"assistant_confidence_threshold": 0.6, "specd_open_confidence": 0.5}))
    settings = Settings(models={"draft": str(folder)})
    assert draft_confidence(settings, opening=True) == 0.5 and draft_confidence(settings) == 0.6
    config = edge_config(settings)
    assert (config.draft_confidence, config.draft_open_confidence) == (0.6, 0.5)
    assert draft_confidence(Settings(models={"draft": str(folder)}, edge={"draft_open_confidence": 0}),
                            opening=True) == 0.0
    assert draft_confidence(Settings(models={"draft": "bundled:draft"}), opening=True) == 0.0
    assert cut_options(Scripted(SCRIPT, 3), 0.6, 0.5) == {"min_confidence": 0.6, "open_confidence": 0.5}
    assert cut_options(Scripted(SCRIPT, 3), 0.0, 0.5) == {"open_confidence": 0.5}


def test_the_shipped_real_draft_recommends_the_bar() -> None:
    import json
    from pathlib import Path

    import common

    shipped = Path(common.__file__).parent / "assets" / "smollm2_draft" / "generation_config.json"
    assert json.loads(shipped.read_text())["specd_open_confidence"] == 0.5
