"""Pure sampling maths: hand-built logits, seeded determinism, distribution tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sampling_reference import filtered, uniforms, verify_one

from common.nucleus import filter_rows
from common.rejection import FlatRound, verify_round
from common.sampling import (
    SamplingParams,
    SparseDistribution,
    apply_stop_rules,
    filter_logits,
    round_generator,
    round_uniforms,
    sample_sparse,
    sparse_draft_distribution,
)


def test_filter_logits_top_k_keeps_k_largest() -> None:
    probs = filter_logits(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 1.0, top_k=2, top_p=1.0)[0]
    assert (probs > 0).tolist() == [False, True, True, False]
    assert probs.sum().item() == pytest.approx(1.0)


def test_filter_logits_top_p_keeps_smallest_prefix_reaching_p() -> None:
    # Clear of the boundary on any CPU: before the third token the mass is 0.85 >= 0.8.
    logits = torch.log(torch.tensor([[0.5, 0.35, 0.1, 0.05]]))
    probs = filter_logits(logits, 1.0, top_k=0, top_p=0.8)[0]
    assert (probs > 0).tolist() == [True, True, False, False]
    assert probs[:2].tolist() == pytest.approx([0.5 / 0.85, 0.35 / 0.85])


@pytest.mark.parametrize(("top_p", "kept"), [(0.75, 2), (0.7500001, 4), (0.7499999, 2), (0.5, 1)])
def test_top_p_boundary_is_strict_and_exact(top_p: float, kept: int) -> None:
    """The definition at the knife edge, on values every CPU holds exactly (dyadic floats, no
    ``exp``): a token is kept iff the mass before it is *below* ``top_p`` of the total, and
    ties with the last kept token stay with it (0.75 before the third token: not kept at 0.75;
    just above it, the third is kept and its tie the fourth too)."""
    e = torch.tensor([[0.5, 0.25, 0.125, 0.125]])
    probs = filter_rows(e, torch.zeros(1, dtype=torch.long), torch.tensor([top_p]))[0]
    assert int((probs > 0).sum()) == kept


def test_filter_logits_temperature_sharpens() -> None:
    logits = torch.tensor([[0.0, 1.0]])
    cold = filter_logits(logits, 0.5, 0, 1.0)[0]
    hot = filter_logits(logits, 2.0, 0, 1.0)[0]
    assert cold[1] > hot[1] > 0.5


def flat(drafts: list[list[int]], params: list[SamplingParams], supports=None, seqs=None,
         uniforms=None) -> FlatRound:
    """A FlatRound by hand: ``supports[b][j]`` is (ids, probs) of q_j for sampled session b."""
    gamma = np.array([len(d) for d in drafts], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(gamma + 1)))
    ids = np.zeros(offsets[-1], np.int64)
    q = np.ones(offsets[-1], np.float32)
    rows, sup_ids, sup_probs = [], [], []
    for b, d in enumerate(drafts):
        ids[offsets[b]:offsets[b] + len(d)] = d
        for j, token in enumerate(d):
            if supports and supports[b]:
                s_ids, s_probs = supports[b][j]
                norm = np.asarray(s_probs, np.float64) / np.sum(s_probs)
                q[offsets[b] + j] = np.float32(norm[s_ids.index(token)])
                rows += [offsets[b] + j] * len(s_ids)
                sup_ids += s_ids
                sup_probs += norm.astype(np.float32).tolist()
    if uniforms is None:
        uniforms = round_uniforms([p.seed for p in params], seqs or [0] * len(params), gamma)
    return FlatRound(
        offsets=offsets, draft_ids=ids, draft_q=q, support_rows=np.asarray(rows, np.int64),
        support_ids=np.asarray(sup_ids, np.int64), support_probs=np.asarray(sup_probs, np.float32),
        greedy=np.array([p.greedy for p in params]),
        temperature=np.array([max(p.temperature, 1e-5) for p in params], np.float32),
        top_k=np.array([p.top_k for p in params], np.int64),
        top_p=np.array([p.top_p for p in params], np.float32), uniforms=np.asarray(uniforms),
    )


def one_hot_logits(argmax_rows: list[list[int]], vocab: int = 6) -> torch.Tensor:  # [T, V]
    return torch.cat([torch.nn.functional.one_hot(torch.tensor(r), vocab).float() * 5 for r in argmax_rows])


def test_greedy_accepts_matching_prefix_and_corrects_first_mismatch() -> None:
    # Session 0: drafts 1,2,3 vs target 1,2,4 -> 2 accepted, correction 4.
    # Session 1: drafts 5,5 match -> all accepted, bonus is the target's argmax after them (3).
    # Session 2: no drafts -> the token is the target's next token (2).
    logits = one_hot_logits([[1, 2, 4, 0], [5, 5, 3], [2]])
    result = verify_round(logits, flat([[1, 2, 3], [5, 5], []], [SamplingParams()] * 3))
    assert result.num_accepted.tolist() == [2, 2, 0]
    assert result.next_token.tolist() == [4, 3, 2]


def test_greedy_first_token_wrong_accepts_nothing() -> None:
    result = verify_round(one_hot_logits([[3, 1, 1]]), flat([[2, 1]], [SamplingParams()]))
    assert result.num_accepted.tolist() == [0] and result.next_token.tolist() == [3]


def test_sampled_acceptance_and_residual_on_hand_built_distributions() -> None:
    # p = [0.1, 0.6, 0.3], q = [0.5, 0.5, 0]; draft token 0 has p/q = 0.2.
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]))
    params = [SamplingParams(temperature=1.0)]
    support = [[([0, 1], [0.5, 0.5])]]
    accepted = verify_round(logits, flat([[0]], params, support, uniforms=[0.1, 0.99]))
    assert accepted.num_accepted.tolist() == [1]
    assert accepted.next_token.tolist() == [2]  # bonus: u = 0.99 falls in p[1]'s last token
    rejected = verify_round(logits, flat([[0]], params, support, uniforms=[0.5, 0.3]))
    assert rejected.num_accepted.tolist() == [0]
    # residual = max(0, p - q) = [0, 0.1, 0.3] -> cdf [0, .25, 1]: u = 0.3 picks token 2.
    assert rejected.next_token.tolist() == [2]
    low = verify_round(logits, flat([[0]], params, support, uniforms=[0.5, 0.2]))
    assert low.next_token.tolist() == [1]


def _first_tokens(p: torch.Tensor, q: torch.Tensor, trials: int, seed: int) -> torch.Tensor:
    """First output token of ``trials`` one-draft rounds, batched in one call, new noise."""
    generator = torch.Generator().manual_seed(seed)
    drafts = torch.multinomial(q.expand(trials, -1), 1, replacement=True, generator=generator)[:, 0]
    params = [SamplingParams(temperature=1.0, seed=seed * trials + i) for i in range(trials)]
    support_ids = torch.nonzero(q).squeeze(1).tolist()
    supports = [[(support_ids, q[support_ids].tolist())] for _ in range(trials)]
    logits = torch.log(p).expand(trials, -1, -1).reshape(2 * trials, -1)
    result = verify_round(logits, flat([[int(d)] for d in drafts], params, supports))
    return torch.where(result.num_accepted > 0, drafts, result.next_token)


@pytest.mark.parametrize("q_values", [
    [0.25, 0.25, 0.25, 0.25, 0.0],  # q misses a token p has
    [0.05, 0.05, 0.1, 0.2, 0.6],  # q puts mass where p has little
])
def test_rejection_sampling_output_follows_target_distribution(q_values: list[float]) -> None:
    """The law of the output under the counter-based uniforms and inverse-CDF draws."""
    p_values = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    q = torch.tensor(q_values)
    p = torch.stack([p_values, torch.tensor([0.2] * 5)])  # row 1 (bonus) is irrelevant here
    trials = 40_000
    tokens = _first_tokens(p, q, trials, seed=11)
    empirical = torch.bincount(tokens, minlength=5).double() / trials
    sigma = torch.sqrt(p_values.double() * (1 - p_values.double()) / trials)
    assert torch.all((empirical - p_values.double()).abs() <= 5 * sigma + 1e-9), empirical


def test_output_follows_the_top_p_target_at_a_large_vocabulary() -> None:
    """The same law through the large-vocabulary path: float32 bounds decide the acceptance
    tests, the final draws run on compacted kept sets after a top-p cut."""
    vocab, trials = 4200, 2500  # > SORT_VOCAB
    raw = torch.full((vocab,), 1e-12)
    raw[:5] = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])
    kept = raw.clone()
    kept[4:] = 0  # top_p 0.95: the mass before token 4 is 0.96, so tokens 0-3 are kept
    p_values = kept.double() / kept.double().sum()
    q = torch.zeros(vocab)
    q[[0, 1, 4, 7]] = torch.tensor([0.1, 0.5, 0.3, 0.1])  # q has mass p lacks (4, 7)
    generator = torch.Generator().manual_seed(13)
    drafts = torch.multinomial(q.expand(trials, -1), 1, replacement=True, generator=generator)[:, 0]
    params = [SamplingParams(temperature=1.0, top_p=0.95, seed=7 * trials + i) for i in range(trials)]
    support = [0, 1, 4, 7]
    supports = [[(support, q[support].tolist())] for _ in range(trials)]
    logits = torch.log(raw).expand(trials, 2, -1).reshape(2 * trials, -1)
    result = verify_round(logits, flat([[int(d)] for d in drafts], params, supports))
    tokens = torch.where(result.num_accepted > 0, drafts, result.next_token)
    empirical = torch.bincount(tokens, minlength=vocab).double() / trials
    assert empirical[4:].sum() == 0  # nothing outside the nucleus, although q drafts 4 and 7
    sigma = torch.sqrt(p_values[:4] * (1 - p_values[:4]) / trials)
    assert torch.all((empirical[:4] - p_values[:4]).abs() <= 5 * sigma), empirical[:4]


def test_round_uniforms_are_uniform_and_keyed_by_seed_sequence_and_counter() -> None:
    gamma = np.array([3, 0, 5])
    a = round_uniforms([7, 7, 9], [3, 3, 3], gamma)
    assert a.shape == (11,) and np.array_equal(a, round_uniforms([7, 7, 9], [3, 3, 3], gamma))
    assert a[3] == a[4]  # same key: the same final draw, whatever gamma
    alone = round_uniforms([9], [3], np.array([5]))
    assert np.array_equal(alone, a[5:])  # a session's draws do not depend on its batch
    assert not np.array_equal(a[:4], round_uniforms([7], [4], np.array([3])))
    many = round_uniforms(list(range(20000)), [0] * 20000, np.zeros(20000, np.int64))
    assert abs(many.mean() - 0.5) < 0.01 and many.min() >= 0 and many.max() < 1


def test_batched_filter_matches_the_sorting_reference_with_ties() -> None:
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(24, 5000, generator=generator) * 3).bfloat16()  # bf16: many ties
    settings = [(0.8, 0, 0.95), (1.0, 40, 1.0), (0.5, 200, 0.9), (1.3, 0, 0.5), (0.7, 3, 0.99),
                (1.0, 0, 1.0)]
    for row in range(logits.shape[0]):
        temperature, top_k, top_p = settings[row % len(settings)]
        ours = filter_logits(logits[row:row + 1], temperature, top_k, top_p)[0]
        ref = filtered(logits[row], SamplingParams(temperature, top_p, top_k))
        assert torch.equal(ours > 0, ref > 0), (row, int((ours > 0).sum()), int((ref > 0).sum()))
        assert torch.allclose(ours.double(), ref, atol=1e-6)


@pytest.mark.parametrize(("slack", "layout"), [
    (None, "compact"),  # the bounds decide most tests; final rows compact their candidates
    (0.5, "compact"),  # the bounds decide little: the exact kept sets run on most rows
    (0.5, "sure_floor"),  # the histogram's floor misses the cut: the sure floor takes over
    (0.5, "dense"),  # candidates too wide to compact: dense rows
])
def test_round_matches_the_per_session_reference(slack, layout, monkeypatch) -> None:
    import common.nucleus as nucleus

    if slack is not None:
        monkeypatch.setattr("common.rejection.SLACK", slack)
    if layout == "sure_floor":
        monkeypatch.setattr(nucleus, "_histogram_floor", lambda e, top_p: e.amax(dim=-1))
        monkeypatch.setattr(nucleus, "COMPACT_SHARE", 1)  # however wide the sure floor leaves it
    if layout == "dense":
        monkeypatch.setattr(nucleus, "COMPACT_SHARE", 10**9)
    layouts: list[bool] = []
    original = nucleus.kept_tokens

    def spy(e, top_p):
        groups = original(e, top_p)
        layouts.extend(group.kept.ids is not None for group in groups)
        return groups

    monkeypatch.setattr("common.rejection.kept_tokens", spy)
    generator = torch.Generator().manual_seed(5)
    vocab, gammas = 6000, [4, 0, 2, 5, 1, 3, 4, 2]  # > SORT_VOCAB: the bounds path
    params = [SamplingParams(0.8, 0.95, 0, 1), SamplingParams(), SamplingParams(1.0, 1.0, 50, 2),
              SamplingParams(0.6, 0.9, 20, 3), SamplingParams(1.2, 0.8, 0, 4), SamplingParams(),
              SamplingParams(1.0, 1.0, 0, 6), SamplingParams(0.9, 0.97, 100, 7)]
    for trial in range(6):
        logits = torch.randn(sum(g + 1 for g in gammas), vocab, generator=generator) * 3
        drafts, supports, offset = [], [], 0
        for g, param in zip(gammas, params, strict=True):
            rows = logits[offset:offset + g + 1]
            top = torch.topk(rows, 8, dim=-1).indices.tolist()
            drafts.append([top[j][trial % 3] for j in range(g)])  # often, not always, acceptable
            supports.append([(top[j], [0.4, 0.2, 0.1, 0.1, 0.08, 0.06, 0.04, 0.02]) for j in range(g)]
                            if not param.greedy else [])
            offset += g + 1
        result = verify_round(logits, flat(drafts, params, supports, seqs=[trial] * len(params)))
        offset = 0
        for b, (g, param) in enumerate(zip(gammas, params, strict=True)):
            expected = verify_one(logits[offset:offset + g + 1], drafts[b], param, supports[b],
                                  uniforms(param.seed, trial, g))
            assert (int(result.num_accepted[b]), int(result.next_token[b])) == expected, (trial, b)
            offset += g + 1
    assert (True in layouts) == (layout != "dense") and False in layouts  # top_p 1 rows: dense


def test_row_argmax_is_the_first_maximum_with_ties_and_a_tail() -> None:
    from common.rejection import row_argmax

    generator = torch.Generator().manual_seed(0)
    for vocab in (1031 * 8, 128256, 151936 + 5):
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(12, vocab, generator=generator) * 3).to(dtype)
            x[3] = 0  # all tied
            x[4, -5:] = 100  # the maximum in the tail past the last whole chunk
            x[5, [7, 900]] = 50  # tied maxima in different chunks
            x[6, [vocab - 1, 0]] = 80  # the first index beats a tied tail
            assert torch.equal(row_argmax(x), x.argmax(dim=-1)), (vocab, dtype)


def test_sparse_distribution_truncates_and_sampling_follows_it() -> None:
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    dist = sparse_draft_distribution(probs, max_support=3)
    assert dist.ids.tolist() == [0, 1, 2]
    assert dist.normalised().sum() == pytest.approx(1.0)
    generator = round_generator(1, 0, "draft")
    draws = [sample_sparse(dist, generator) for _ in range(20_000)]
    counts = np.bincount(draws, minlength=5) / len(draws)
    assert counts[3] == counts[4] == 0  # never outside the support that is sent
    assert counts[:3] == pytest.approx(dist.normalised(), abs=0.015)


def test_sparse_distribution_of_a_point_mass() -> None:
    dist = sparse_draft_distribution(torch.tensor([0.0, 1.0, 0.0]), max_support=8)
    assert dist.ids.tolist() == [1]
    assert sample_sparse(dist, torch.Generator().manual_seed(0)) == 1


def test_sparse_distribution_probabilities_are_float32() -> None:
    dist = SparseDistribution(np.array([3, 1], np.uint32), np.array([0.25, 0.5], np.float32))
    assert dist.normalised().tolist() == pytest.approx([1 / 3, 2 / 3])


@pytest.mark.parametrize("tokens, so_far, stops, limit, expected", [
    ([5, 6, 7], 0, frozenset(), 10, ([5, 6, 7], None)),
    ([5, 2, 7], 0, frozenset({2}), 10, ([5, 2], "stop")),
    ([5, 6, 7], 8, frozenset(), 10, ([5, 6], "length")),
    ([5, 6, 7], 0, frozenset(), 1, ([5], "length")),
    ([2, 6, 7], 9, frozenset({2}), 10, ([2], "stop")),
    ([5, 6, 2], 8, frozenset({2}), 10, ([5, 6], "length")),  # the stop lies past the limit
])
def test_apply_stop_rules(tokens, so_far, stops, limit, expected) -> None:
    assert apply_stop_rules(tokens, so_far, stops, limit) == expected


def test_output_follows_the_real_targets_distribution(real_target: str) -> None:
    """The law on SmolLM2-135M-Instruct's own next-token logits (vocabulary 49,152, a real
    spread: a few likely tokens and a long tail) at temperature 0.8 / top-p 0.9, against a draft
    distribution shaped like an edge's: the top 64 of a flatter view of the same logits."""
    from common.models import encode_prompt, load_causal_lm

    target = load_causal_lm(real_target)
    prompt = encode_prompt(target.tokenizer, "Name a colour.", chat=True)
    with torch.no_grad():
        raw = target.model(torch.tensor([prompt])).logits[0, -1].float()
    params = SamplingParams(temperature=0.8, top_p=0.9)
    p_values = filtered(raw, params)
    top = torch.topk(torch.softmax(raw / 2.0, -1), 64)  # q: flatter, and truncated as edges send it
    support = top.indices.tolist()
    q = torch.zeros_like(raw)
    q[top.indices] = top.values / top.values.sum()
    assert int((p_values > 0).sum()) > 2 and float(p_values.max()) < 0.9  # a spread, not a point mass
    counts = torch.zeros(raw.numel(), dtype=torch.float64)
    trials, chunk = 2000, 250  # chunks: 2 rows x 49,152 logits per trial
    generator = torch.Generator().manual_seed(17)
    for start in range(0, trials, chunk):
        drafts = torch.multinomial(q.expand(chunk, -1), 1, replacement=True, generator=generator)[:, 0]
        batch = [SamplingParams(temperature=0.8, top_p=0.9, seed=start + i) for i in range(chunk)]
        supports = [[(support, q[support].tolist())] for _ in range(chunk)]
        logits = raw.expand(chunk, 2, -1).reshape(2 * chunk, -1)
        result = verify_round(logits, flat([[int(d)] for d in drafts], batch, supports))
        tokens = torch.where(result.num_accepted > 0, drafts, result.next_token)
        counts += torch.bincount(tokens, minlength=raw.numel()).double()
    empirical = counts / trials
    assert empirical[p_values == 0].sum() == 0  # nothing outside the nucleus, whatever q drafts
    likely = p_values > 0.02
    sigma = torch.sqrt(p_values[likely] * (1 - p_values[likely]) / trials)
    assert torch.all((empirical[likely] - p_values[likely]).abs() <= 5 * sigma), (
        empirical[likely], p_values[likely])
    rest = float(p_values[~likely].sum())  # the tail, pooled
    assert abs(float(empirical[~likely].sum()) - rest) <= 5 * (rest * (1 - rest) / trials) ** 0.5 + 1e-9
