"""The target engine and the torch draft backend on tiny real models (no Redis)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.models import load_causal_lm
from common.sampling import SamplingParams, apply_stop_rules, filter_logits
from common.wire import DraftBatch, SamplingSpec, SessionOpen
from edge_worker.backends.torch_backend import TorchDraftBackend
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
def draft(tiny_pair):
    return TorchDraftBackend(load_causal_lm(tiny_pair["draft"]))


def test_target_only_matches_transformers_generate(target, engine) -> None:
    for prompt in PROMPTS:
        ids = target.tokenizer.encode(prompt)
        ours = generate_target_only(engine, ids, SamplingParams(), frozenset(), 24)
        reference = target.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                          min_new_tokens=24)[0, len(ids):].tolist()
        assert ours == reference


def run_local(engine: TargetEngine, backend: TorchDraftBackend, prompts: list[list[int]],
              spec: SamplingSpec | list[SamplingSpec], gamma: int,
              min_confidence: float = 0.0) -> list[VerifierSession]:
    """Drive sessions in lock-step, all verified in one batch per round (the worker, minus I/O)."""
    specs = spec if isinstance(spec, list) else [spec] * len(prompts)
    sessions = [VerifierSession.from_open(SessionOpen(f"s{i}", np.asarray(p, np.uint32), sp, "d", ""))
                for i, (p, sp) in enumerate(zip(prompts, specs, strict=True))]
    states = [backend.new_state() for _ in sessions]
    while live := [i for i, s in enumerate(sessions) if not s.finished]:
        pendings = []
        for i in live:
            s = sessions[i]
            room = s.max_new_tokens - s.generated
            proposal = backend.propose(states[i], s.context, min(gamma, room - 1), s.params,
                                       s.next_seq, s.stop_token_ids, 64, min_confidence=min_confidence)
            ids, sizes, sup_ids, sup_probs = proposal.wire_arrays()
            pendings.append(PendingDraft("0-0", DraftBatch(s.session_id, s.next_seq, len(s.context),
                                                           ids, sizes, sup_ids, sup_probs), 0.0))
        outcomes = engine.verify([sessions[i].request(p) for i, p in zip(live, pendings, strict=True)])
        for i, pending, outcome in zip(live, pendings, outcomes, strict=True):
            sessions[i].commit(pending.draft, outcome)
            if sessions[i].finished:
                sessions[i].kv.clear()  # as the worker does: give the KV extent back
    return sessions


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_batched_greedy_speculation_equals_target_greedy(target, engine, draft, gamma) -> None:
    prompts = [target.tokenizer.encode(p) for p in PROMPTS]
    sessions = run_local(engine, draft, prompts, SamplingSpec(max_new_tokens=30), gamma)
    for prompt, session in zip(prompts, sessions, strict=True):
        reference = generate_target_only(engine, prompt, SamplingParams(), frozenset(), 30)
        assert session.context[len(prompt):] == reference
    drafted = sum(s.drafted for s in sessions)
    accepted = sum(s.accepted for s in sessions)
    assert 0 < accepted < drafted  # a realistic pair: some drafts rejected, some accepted


def test_identical_draft_accepts_everything_in_ceil_passes(tiny_pair, target) -> None:
    engine = TargetEngine(target.model, target.vocab_size)
    same = TorchDraftBackend(load_causal_lm(tiny_pair["target"]))
    for gamma, total in [(3, 10), (4, 20), (2, 1)]:
        before = engine.forward_passes
        [session] = run_local(engine, same, [target.tokenizer.encode("import os")],
                              SamplingSpec(max_new_tokens=total), gamma)
        assert session.generated == total and session.accepted == session.drafted
        assert engine.forward_passes - before == -(-total // (gamma + 1))


def test_sessions_of_different_lengths_share_one_pass(target, engine, draft) -> None:
    prompts = [target.tokenizer.encode("x" * n) for n in (1, 7, 19)]
    before = engine.forward_passes
    run_local(engine, draft, prompts, SamplingSpec(max_new_tokens=5), 4)
    rounds = engine.forward_passes - before
    assert rounds <= 5  # lock-step rounds, never one pass per session


def _exact_two_token_distribution(model, prompt: list[int], params: SamplingParams) -> dict:
    """p(t1, t2) of the filtered target, computed exhaustively."""
    with torch.no_grad():
        first = filter_logits(model(torch.tensor([prompt])).logits[0, -1:], params.temperature,
                              params.top_k, params.top_p)[0]
        joint = {}
        for t1 in torch.nonzero(first).flatten().tolist():
            second = filter_logits(model(torch.tensor([[*prompt, t1]])).logits[0, -1:],
                                   params.temperature, params.top_k, params.top_p)[0]
            for t2 in torch.nonzero(second).flatten().tolist():
                joint[(t1, t2)] = float(first[t1] * second[t2])
    return joint


@pytest.mark.parametrize("cut", [0.0, 0.5])
def test_sampled_speculation_follows_target_distribution(target, engine, draft, cut) -> None:
    """The joint law of the first two generated tokens equals the filtered target's, also when
    rounds end early on the draft's low confidence (``edge.draft_confidence``)."""
    prompt = target.tokenizer.encode("def add(a, b):")
    params = SamplingParams(temperature=1.5, top_k=4, top_p=1.0)
    exact = _exact_two_token_distribution(target.model, prompt, params)
    trials = 3000
    counts: dict = {}
    batch = 250
    for start in range(0, trials, batch):
        specs = [SamplingSpec(1.5, 1.0, 4, seed, 2) for seed in range(start, start + batch)]
        for s in run_local(engine, draft, [prompt] * batch, specs, 3, cut):
            key = tuple(s.context[len(prompt):len(prompt) + 2])
            counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= set(exact)
    tv = 0.5 * sum(abs(counts.get(k, 0) / trials - p) for k, p in exact.items())
    assert tv < 0.05, (tv, counts, exact)


def test_same_seed_same_output(target, engine, draft) -> None:
    prompt = target.tokenizer.encode("import os")
    spec = SamplingSpec(temperature=0.9, seed=1234, max_new_tokens=20)
    first = run_local(engine, draft, [prompt], spec, 4)[0].context
    again = run_local(engine, draft, [prompt], spec, 4)[0].context
    other = run_local(engine, draft, [prompt], SamplingSpec(0.9, 1.0, 0, 99, 20), 4)[0].context
    assert first == again and first != other


def test_stop_token_inside_accepted_draft_ends_output(tiny_pair, target) -> None:
    engine = TargetEngine(target.model, target.vocab_size)
    same = TorchDraftBackend(load_causal_lm(tiny_pair["target"]))
    prompt = target.tokenizer.encode("class Stack:")
    free = generate_target_only(engine, prompt, SamplingParams(), frozenset(), 12)
    stop = free[5]
    expected, _ = apply_stop_rules(free, 0, frozenset({stop}), 12)
    [session] = run_local(engine, same, [prompt], SamplingSpec(max_new_tokens=12,
                                                               stop_token_ids=(stop,)), 8)
    assert session.context[len(prompt):] == expected and session.finished == "stop"


def test_mixed_batch_matches_the_per_session_reference_past_2048_tokens() -> None:
    """Greedy and sampled sessions, different gammas, top-k/top-p, contexts over 2,048 tokens:
    each round's batched outcome equals a plain, uncached, one-session forward followed by the
    one-session reference maths (tests/sampling_reference.py) with the same seeds."""
    from sampling_reference import uniforms, verify_one
    from transformers import LlamaConfig, LlamaForCausalLM

    from verifier_worker.engine import Draft, VerifyRequest
    from verifier_worker.kv import SessionKV

    torch.manual_seed(0)
    vocab = 300
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    engine = TargetEngine(model, vocab, kv_budget_tokens=16384)
    rng = np.random.default_rng(1)
    lengths = [2100, 40, 2300, 300, 2050, 10]
    gammas = [4, 2, 5, 0, 3, 1]
    params = [SamplingParams(), SamplingParams(0.8, 0.95, 0, 11), SamplingParams(1.0, 1.0, 20, 12),
              SamplingParams(1.2, 1.0, 0, 13), SamplingParams(), SamplingParams(0.7, 0.9, 5, 15)]
    contexts = [rng.integers(2, vocab, n).tolist() for n in lengths]
    kvs = [SessionKV() for _ in lengths]
    accepted = 0
    for seq in range(3):
        requests, supports = [], []
        for ctx, kv, g, param in zip(contexts, kvs, gammas, params, strict=True):
            draft_ids = rng.integers(2, vocab, g)
            if param.greedy and g:  # greedy drafts that the target accepts in part
                with torch.no_grad():
                    draft_ids[0] = int(model(torch.tensor([ctx])).logits[0, -1].argmax())
            rows = [[int(t), *rng.choice(vocab, 7, replace=False).tolist()] for t in draft_ids]
            rows = [list(dict.fromkeys(r)) for r in rows]
            probs = [rng.dirichlet(np.ones(len(r))).astype(np.float32).tolist() for r in rows]
            support = [] if param.greedy else list(zip(rows, probs, strict=True))
            supports.append(support)
            draft = Draft(draft_ids.astype(np.uint32),
                          np.array([len(r) for r in rows] if support else [], np.uint16),
                          np.array([t for r in rows for t in r] if support else [], np.uint32),
                          np.array([p for r in probs for p in r] if support else [], np.float32))
            requests.append(VerifyRequest(kv, ctx, draft, param, seq))
        outcomes = engine.verify(requests)
        for request, support, outcome in zip(requests, supports, outcomes, strict=True):
            draft = request.draft.token_ids.tolist()
            with torch.no_grad():
                logits = model(torch.tensor([request.context + draft])).logits[0, -len(draft) - 1:]
            expected = verify_one(logits, draft, request.params, support,
                                  uniforms(request.params.seed, seq, len(draft)))
            assert (outcome.accepted, outcome.token) == expected, (seq, len(request.context))
            request.context.extend([*draft[:outcome.accepted], outcome.token])
            accepted += outcome.accepted
    assert accepted > 0  # sampled rows accepted some drafts: the acceptance tests ran both ways
    assert engine.arena.used_tokens < 16384 and engine.arena.preemptions == 0


def test_logprobs_of_speculative_rounds_equal_a_plain_forward(target, engine, draft) -> None:
    """Greedy speculation with logprobs: each committed token's figures come from the pass that
    committed it and equal the target's own log-softmax over the whole sequence."""
    from verifier_worker.engine import VerifyOutcome

    prompts = [target.tokenizer.encode(p) for p in PROMPTS[:3]]
    opens = [SessionOpen(f"s{i}", np.asarray(p, np.uint32), SamplingSpec(max_new_tokens=20), "d", "",
                         logprobs=top) for i, (p, top) in enumerate(zip(prompts, [3, 0, None], strict=True))]
    sessions = [VerifierSession.from_open(o) for o in opens]
    states = [draft.new_state() for _ in sessions]
    seen: list[list[VerifyOutcome]] = [[] for _ in sessions]
    while live := [i for i, s in enumerate(sessions) if not s.finished]:
        pendings = []
        for i in live:
            s = sessions[i]
            proposal = draft.propose(states[i], s.context, min(4, s.max_new_tokens - s.generated - 1),
                                     s.params, s.next_seq, s.stop_token_ids, 64)
            ids, sizes, sup_ids, sup_probs = proposal.wire_arrays()
            pendings.append(PendingDraft("0-0", DraftBatch(s.session_id, s.next_seq, len(s.context),
                                                           ids, sizes, sup_ids, sup_probs), 0.0))
        outcomes = engine.verify([sessions[i].request(p) for i, p in zip(live, pendings, strict=True)])
        for i, pending, outcome in zip(live, pendings, outcomes, strict=True):
            sessions[i].commit(pending.draft, outcome)
            seen[i].append(outcome)
    for session, outcomes, prompt, top in zip(sessions, seen, prompts, [3, 0, None], strict=True):
        session.kv.clear()
        if top is None:
            assert all(o.logprobs is None for o in outcomes)
            continue
        chosen = np.concatenate([o.logprobs.chosen for o in outcomes])
        top_ids = np.concatenate([o.logprobs.top_ids for o in outcomes])
        generated = session.context[len(prompt):]
        with torch.no_grad():
            logits = target.model(torch.tensor([session.context])).logits[0, len(prompt) - 1:-1]
        reference = torch.log_softmax(logits.float(), dim=-1)
        assert len(chosen) == len(generated) == 20 and top_ids.shape == (20, top)
        expected = reference.gather(1, torch.tensor(generated).unsqueeze(1)).squeeze(1).numpy()
        np.testing.assert_allclose(chosen, expected, atol=1e-4)
        if top:
            assert top_ids[:, 0].tolist() == generated  # greedy: the chosen token is the most likely
            picked = reference.gather(1, torch.from_numpy(top_ids.astype(np.int64)))
            np.testing.assert_allclose(np.concatenate([o.logprobs.top_logprobs for o in outcomes]),
                                       picked.numpy(), atol=1e-4)
            assert bool((picked[:, -1] >= reference.topk(top).values[:, -1] - 1e-4).all())
