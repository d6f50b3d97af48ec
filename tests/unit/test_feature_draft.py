"""Feature drafting (common.feature_draft) on the tiny target: the verifier's features, the edge's
drafts from them, and exactness of speculative decoding with them (no Redis)."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models
import torch

from common.models import ModelLoadError, load_causal_lm
from common.sampling import SamplingParams
from common.settings import Settings
from common.wire import (
    DraftBatch,
    ErrorCode,
    SamplingSpec,
    SessionOpen,
    Verdict,
    WireError,
    decode,
    encode,
)
from edge_worker.backends import build_drafter
from edge_worker.backends.feature_backend import FeatureDraftBackend
from verifier_worker.engine import TargetEngine, generate_target_only
from verifier_worker.session import PendingDraft, VerifierSession

PROMPTS = ["def add(a, b):", "import os", "class Stack:", "for i in range(10):", "print(x)"]


@pytest.fixture(scope="module")
def target(tiny_pair):
    return load_causal_lm(tiny_pair["target"])


@pytest.fixture(scope="module")
def engine(target):
    return TargetEngine(target.model, target.vocab_size)


@pytest.fixture(scope="module")
def feature_folder(tiny_pair, tmp_path_factory):
    return tiny_models.feature_draft_for(tiny_pair["target"], tmp_path_factory.mktemp("feature") / "d")


@pytest.fixture(scope="module")
def backend(feature_folder) -> FeatureDraftBackend:
    built = build_drafter(Settings(), "torch", str(feature_folder))  # the torch drafter hands it on
    assert isinstance(built, FeatureDraftBackend)
    return built


def run_local(engine, backend, prompts, spec, gamma):
    """Sessions in lock-step, one verify per round, each verdict's feature handed to the draft."""
    specs = spec if isinstance(spec, list) else [spec] * len(prompts)
    sessions = [VerifierSession.from_open(SessionOpen(f"s{i}", np.asarray(p, np.uint32), sp, "d", "",
                                                      features=True))
                for i, (p, sp) in enumerate(zip(prompts, specs, strict=True))]
    states = [backend.new_state() for _ in sessions]
    firsts = []
    while live := [i for i, s in enumerate(sessions) if not s.finished]:
        pendings = []
        for i in live:
            s = sessions[i]
            proposal = backend.propose(states[i], s.context, min(gamma, s.max_new_tokens - s.generated - 1),
                                       s.params, s.next_seq, s.stop_token_ids, 64)
            if s.next_seq == 0:
                firsts.append(len(proposal.token_ids))
            ids, sizes, sup_ids, sup_probs = proposal.wire_arrays()
            pendings.append(PendingDraft("0-0", DraftBatch(s.session_id, s.next_seq, len(s.context),
                                                           ids, sizes, sup_ids, sup_probs), 0.0))
        outcomes = engine.verify([sessions[i].request(p) for i, p in zip(live, pendings, strict=True)])
        for i, pending, outcome in zip(live, pendings, outcomes, strict=True):
            sessions[i].commit(pending.draft, outcome)
            assert outcome.feature  # every asking session's outcome carries one
            backend.observe(states[i], outcome.feature, len(sessions[i].context))
            if sessions[i].finished:
                sessions[i].kv.clear()
    assert firsts == [0] * len(prompts)  # no feature before the first verdict: nothing drafted
    return sessions


def test_the_feature_is_the_output_layers_input_at_the_producing_row(target, engine) -> None:
    """Each outcome's feature equals the target's final hidden state (a plain forward's) at the
    position whose logits produced the outcome's token (float16 on the wire)."""
    prompts = [target.tokenizer.encode(p) for p in PROMPTS[:3]]
    sessions = [VerifierSession.from_open(SessionOpen(f"f{i}", np.asarray(p, np.uint32),
                                                      SamplingSpec(max_new_tokens=8), "d", "", features=True))
                for i, p in enumerate(prompts)]
    drafts = [np.asarray(p[:2], np.uint32) for p in prompts]  # drafts the target mostly rejects
    pendings = [PendingDraft("0-0", DraftBatch(s.session_id, 0, len(s.context), d, np.zeros(0, np.uint16),
                                               np.zeros(0, np.uint32), np.zeros(0, np.float32)), 0.0)
                for s, d in zip(sessions, drafts, strict=True)]
    outcomes = engine.verify([s.request(p) for s, p in zip(sessions, pendings, strict=True)])
    for prompt, draft, outcome in zip(prompts, drafts, outcomes, strict=True):
        fed = prompt + draft[:outcome.accepted].tolist()
        with torch.no_grad():
            hidden = target.model(torch.tensor([fed]), output_hidden_states=True).hidden_states[-1][0, -1]
        feature = torch.from_numpy(np.frombuffer(outcome.feature, dtype="<f2").astype(np.float32))
        assert torch.allclose(feature, hidden, atol=2e-2, rtol=1e-2)
    for s in sessions:
        s.kv.clear()


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_speculation_with_a_feature_draft_equals_target_greedy(target, engine, backend, gamma) -> None:
    prompts = [target.tokenizer.encode(p) for p in PROMPTS]
    sessions = run_local(engine, backend, prompts, SamplingSpec(max_new_tokens=24), gamma)
    for prompt, session in zip(prompts, sessions, strict=True):
        assert session.context[len(prompt):] == generate_target_only(engine, prompt, SamplingParams(),
                                                                     frozenset(), 24)
    assert sum(s.drafted for s in sessions) > 0


def test_sampled_speculation_with_a_feature_draft_follows_the_target(target, engine, backend) -> None:
    """The first two sampled tokens' joint law equals the filtered target's (the second drafted
    from the first verdict's feature)."""
    from test_engine import _exact_two_token_distribution

    prompt = target.tokenizer.encode("def add(a, b):")
    params = SamplingParams(temperature=1.5, top_k=4, top_p=1.0)
    exact = _exact_two_token_distribution(target.model, prompt, params)
    trials, counts = 2000, {}
    for start in range(0, trials, 250):
        specs = [SamplingSpec(1.5, 1.0, 4, seed, 3) for seed in range(start, start + 250)]
        for s in run_local(engine, backend, [prompt] * 250, specs, 2):
            key = tuple(s.context[len(prompt):len(prompt) + 2])
            counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= set(exact)
    tv = 0.5 * sum(abs(counts.get(k, 0) / trials - p) for k, p in exact.items())
    assert tv < 0.06, (tv, counts, exact)


def test_a_feature_of_another_size_or_not_finite_drafts_nothing(backend) -> None:
    hidden = backend.draft.config.hidden_size
    for bad in (np.zeros(hidden + 1, "<f2"), np.full(hidden, np.inf, "<f2"), np.zeros(3, "<f2")):
        state = backend.new_state()
        backend.observe(state, bad.tobytes(), 5)
        assert backend.propose(state, [1, 2, 3, 4, 5], 4, SamplingParams(), 0, frozenset(), 8).token_ids == []
    state = backend.new_state()
    backend.observe(state, np.zeros(hidden, "<f2").tobytes(), 5)
    assert len(backend.propose(state, [1, 2, 3, 4, 5], 4, SamplingParams(), 0, frozenset(), 8).token_ids) == 4
    assert backend.propose(state, [1, 2, 3, 4, 5, 6], 4, SamplingParams(), 0, frozenset(), 8).token_ids == []


def test_features_travel_on_the_wire_only_when_asked() -> None:
    spec = SamplingSpec()
    opened = decode(encode(SessionOpen("s", np.asarray([1, 2], np.uint32), spec, "d", "", features=True)))
    assert isinstance(opened, SessionOpen) and opened.features
    plain = decode(encode(SessionOpen("s", np.asarray([1, 2], np.uint32), spec, "d", "")))
    assert isinstance(plain, SessionOpen) and not plain.features
    feature = np.arange(6, dtype="<f2").tobytes()
    verdict = decode(encode(Verdict("s", 0, 1, 5, 3, feature=feature)))
    assert isinstance(verdict, Verdict) and verdict.feature == feature
    assert b"\xa1f" not in encode(Verdict("s", 0, 1, 5, 3))  # no key at all without a feature
    import msgpack

    body = msgpack.unpackb(encode(Verdict("s", 0, 1, 5, 3)), raw=False)
    body["f"] = b"\x00\x01\x02"
    with pytest.raises(WireError) as info:
        decode(msgpack.packb(body, use_bin_type=True))
    assert info.value.code is ErrorCode.MALFORMED


def test_a_feature_draft_does_not_load_as_a_standalone_model(feature_folder) -> None:
    with pytest.raises(ModelLoadError, match="feature draft"):
        load_causal_lm(str(feature_folder))
