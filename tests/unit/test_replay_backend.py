"""Replay drafter: proposes the reference with the configured acceptance; sampled drafts are exact."""

from __future__ import annotations

import numpy as np
import pytest

from common.models import ModelLoadError, vocab_fingerprint
from common.sampling import SamplingParams
from edge_worker.backends.replay import ReplayDraftBackend, ReplayFile


class FakeTokenizer:
    eos_token_id = 0

    def get_vocab(self) -> dict[str, int]:
        return {f"t{i}": i for i in range(50)}


PROMPT = (5, 6, 7)
CONTINUATION = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]


def backend(acceptance: float, fingerprint: str | None = None) -> ReplayDraftBackend:
    tok = FakeTokenizer()
    replay = ReplayFile(target="t", fingerprint=fingerprint or vocab_fingerprint(tok),
                        entries={PROMPT: CONTINUATION}, vocab_size=50, eos_token_ids=frozenset({0}))
    return ReplayDraftBackend(replay, tok, "tok", acceptance)


def test_round_trips_through_a_file(tmp_path) -> None:
    replay = backend(1.0).replay
    replay.save(tmp_path / "r.json")
    loaded = ReplayFile.load(tmp_path / "r.json")
    assert loaded.entries == replay.entries and loaded.fingerprint == replay.fingerprint
    assert loaded.reference_for([*PROMPT, 10, 11]) == [*PROMPT, *CONTINUATION]
    assert loaded.reference_for([1, 2, 3]) is None


def test_full_acceptance_proposes_the_reference() -> None:
    b = backend(1.0)
    state = b.new_state()
    context = [*PROMPT, 10, 11]
    proposal = b.propose(state, context, 4, SamplingParams(seed=1), 0, frozenset({0}), 64)
    assert proposal.token_ids == [12, 13, 14, 15] and not proposal.support_sizes


def test_zero_acceptance_never_proposes_the_reference() -> None:
    b = backend(0.0)
    for seq in range(20):
        proposal = b.propose(b.new_state(), list(PROMPT), 1, SamplingParams(seed=seq), seq, frozenset(), 64)
        assert proposal.token_ids[0] != CONTINUATION[0]


def test_acceptance_rate_is_the_configured_one() -> None:
    b = backend(0.7)
    hits = sum(b.propose(b.new_state(), list(PROMPT), 1, SamplingParams(seed=s), 0, frozenset(), 64)
               .token_ids[0] == CONTINUATION[0] for s in range(2000))
    assert 0.65 < hits / 2000 < 0.75


def test_off_reference_context_still_drafts() -> None:
    b = backend(1.0)
    proposal = b.propose(b.new_state(), [*PROMPT, 99], 3, SamplingParams(seed=2), 0, frozenset(), 64)
    assert len(proposal.token_ids) == 3


def test_sampled_drafts_carry_an_exact_sparse_distribution() -> None:
    b = backend(1.0)
    params = SamplingParams(temperature=0.8, seed=3)
    proposal = b.propose(b.new_state(), list(PROMPT), 4, params, 0, frozenset(), 8)
    assert len(proposal.support_sizes) == len(proposal.token_ids) == 4
    rows = zip(proposal.token_ids, proposal.support_ids, proposal.support_probs, strict=True)
    for token, ids, probs in rows:
        assert ids.dtype == np.uint32 and probs.dtype == np.float32 and ids.size <= 8
        assert len(set(ids.tolist())) == ids.size and token in ids.tolist()
        assert abs(float(probs.sum()) - 1.0) < 1e-5
    assert proposal.support_ids[0][0] == CONTINUATION[0]  # the reference gets the top mass


def test_a_foreign_vocabulary_is_refused() -> None:
    with pytest.raises(ModelLoadError, match="vocabulary"):
        backend(0.5, fingerprint="0" * 32)
