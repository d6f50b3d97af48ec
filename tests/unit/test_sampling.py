"""Pure sampling maths: hand-built logits, seeded determinism, distribution tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.sampling import (
    SparseDistribution,
    apply_stop_rules,
    draw_round_noise,
    filter_logits,
    rejection_sample,
    round_generator,
    sample_sparse,
    sparse_draft_distribution,
)


def test_filter_logits_top_k_keeps_k_largest() -> None:
    probs = filter_logits(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 1.0, top_k=2, top_p=1.0)[0]
    assert (probs > 0).tolist() == [False, True, True, False]
    assert probs.sum().item() == pytest.approx(1.0)


def test_filter_logits_top_p_keeps_smallest_prefix_reaching_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = filter_logits(logits, 1.0, top_k=0, top_p=0.8)[0]
    # 0.5 < 0.8, 0.5 + 0.3 = 0.8 reaches it: the first two stay.
    assert (probs > 0).tolist() == [True, True, False, False]
    assert probs[:2].tolist() == pytest.approx([0.625, 0.375])


def test_filter_logits_temperature_sharpens() -> None:
    logits = torch.tensor([[0.0, 1.0]])
    cold = filter_logits(logits, 0.5, 0, 1.0)[0]
    hot = filter_logits(logits, 2.0, 0, 1.0)[0]
    assert cold[1] > hot[1] > 0.5


def _greedy_inputs(target_argmax: list[list[int]], drafts: list[list[int]], vocab: int = 6):
    batch, gamma = len(drafts), max(len(d) for d in drafts)
    target = torch.zeros(batch, gamma + 1, vocab)
    for b, row in enumerate(target_argmax):
        for j, token in enumerate(row):
            target[b, j, token] = 5.0
    ids = torch.zeros(batch, gamma, dtype=torch.long)
    for b, d in enumerate(drafts):
        ids[b, : len(d)] = torch.tensor(d, dtype=torch.long)
    return dict(
        target_probs=target, draft_token_ids=ids,
        num_draft=torch.tensor([len(d) for d in drafts]),
        draft_token_q=torch.ones(batch, gamma),
        draft_support_ids=torch.zeros(batch, gamma, 1, dtype=torch.long),
        draft_support_probs=torch.zeros(batch, gamma, 1),
        uniforms=torch.zeros(batch, gamma), exponentials=torch.ones(batch, vocab),
        greedy=torch.ones(batch, dtype=torch.bool),
    )


def test_greedy_accepts_matching_prefix_and_corrects_first_mismatch() -> None:
    # Row 0: drafts 1,2,3 vs target 1,2,4 -> 2 accepted, correction 4.
    # Row 1: drafts 5,5 match -> all accepted, bonus is the target's argmax after them (3).
    # Row 2: no drafts -> the token is the target's next token (2).
    result = rejection_sample(**_greedy_inputs(
        target_argmax=[[1, 2, 4, 0], [5, 5, 3, 0], [2, 0, 0, 0]],
        drafts=[[1, 2, 3], [5, 5], []],
    ))
    assert result.num_accepted.tolist() == [2, 2, 0]
    assert result.next_token.tolist() == [4, 3, 2]


def test_greedy_first_token_wrong_accepts_nothing() -> None:
    result = rejection_sample(**_greedy_inputs([[3, 1, 1]], [[2, 1]]))
    assert result.num_accepted.tolist() == [0]
    assert result.next_token.tolist() == [3]


def test_sampled_acceptance_and_residual_on_hand_built_distributions() -> None:
    # p = [0.1, 0.6, 0.3], q = [0.5, 0.5, 0]; draft token 0 has p/q = 0.2.
    p = torch.tensor([[[0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]])
    common = dict(
        target_probs=p, draft_token_ids=torch.tensor([[0]]), num_draft=torch.tensor([1]),
        draft_token_q=torch.tensor([[0.5]]),
        draft_support_ids=torch.tensor([[[0, 1]]]), draft_support_probs=torch.tensor([[[0.5, 0.5]]]),
        exponentials=torch.ones(1, 3), greedy=torch.tensor([False]),
    )
    accepted = rejection_sample(uniforms=torch.tensor([[0.1]]), **common)
    assert accepted.num_accepted.tolist() == [1]
    assert accepted.next_token.tolist() == [2]  # bonus: argmax of p[1] / 1
    rejected = rejection_sample(uniforms=torch.tensor([[0.5]]), **common)
    assert rejected.num_accepted.tolist() == [0]
    # residual = max(0, p - q) = [0, 0.1, 0.3] -> with unit noise its argmax is token 2.
    assert rejected.next_token.tolist() == [2]


def _sampled_round(p: torch.Tensor, q: torch.Tensor, trials: int, seed: int) -> torch.Tensor:
    """First output token of ``trials`` independent one-draft rounds (vectorised)."""
    generator = torch.Generator().manual_seed(seed)
    vocab = p.shape[-1]
    drafts = torch.multinomial(q.expand(trials, vocab), 1, replacement=True, generator=generator)
    support = torch.arange(vocab).expand(trials, 1, vocab)
    result = rejection_sample(
        target_probs=p.expand(trials, 2, vocab).contiguous(), draft_token_ids=drafts,
        num_draft=torch.ones(trials, dtype=torch.long), draft_token_q=q[drafts.squeeze(1)].unsqueeze(1),
        draft_support_ids=support, draft_support_probs=q.expand(trials, 1, vocab),
        uniforms=torch.rand(trials, 1, generator=generator),
        exponentials=torch.empty(trials, vocab).exponential_(generator=generator),
        greedy=torch.zeros(trials, dtype=torch.bool),
    )
    # The first output token: the accepted draft, else the recovered token.
    return torch.where(result.num_accepted > 0, drafts.squeeze(1), result.next_token)


@pytest.mark.parametrize("q_values", [
    [0.25, 0.25, 0.25, 0.25, 0.0],  # q misses a token p has
    [0.05, 0.05, 0.1, 0.2, 0.6],  # q puts mass where p has little
])
def test_rejection_sampling_output_follows_target_distribution(q_values: list[float]) -> None:
    p_values = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    q = torch.tensor(q_values)
    p = torch.stack([p_values, torch.tensor([0.2] * 5)])  # row 1 (bonus) is irrelevant here
    trials = 200_000
    tokens = _sampled_round(p, q, trials, seed=11)
    empirical = torch.bincount(tokens, minlength=5).double() / trials
    sigma = torch.sqrt(p_values.double() * (1 - p_values.double()) / trials)
    assert torch.all((empirical - p_values.double()).abs() <= 5 * sigma + 1e-9), empirical


def test_rejection_sampling_is_deterministic_given_noise() -> None:
    p = torch.tensor([[0.5, 0.5, 0.0], [0.3, 0.3, 0.4]])
    q = torch.tensor([0.2, 0.3, 0.5])
    assert torch.equal(_sampled_round(p, q, 1000, seed=5), _sampled_round(p, q, 1000, seed=5))


def test_round_noise_is_keyed_by_seed_and_sequence() -> None:
    a, b = draw_round_noise(7, 3, 4, 10), draw_round_noise(7, 3, 4, 10)
    assert torch.equal(a.uniforms, b.uniforms) and torch.equal(a.exponentials, b.exponentials)
    assert not torch.equal(a.uniforms, draw_round_noise(7, 4, 4, 10).uniforms)
    assert not torch.equal(a.uniforms, draw_round_noise(8, 3, 4, 10).uniforms)


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
