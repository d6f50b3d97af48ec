"""Sampling maths for speculative decoding: pure functions over tensors, no I/O.

Notation (per session, per round):
    ``gamma``      number of drafted tokens ``d_1 .. d_gamma``.
    ``q_j``        the draft's exact distribution at drafted position ``j`` (sparse: ids + probabilities).
    ``p_j``        the target's distribution at the same position (after temperature/top-k/top-p).

A round produces ``n + 1`` tokens: the ``n`` *accepted* draft tokens (a contiguous prefix, each
kept with probability ``min(1, p_j(d_j) / q_j(d_j))``), then one more token from the target pass:
a *recovered* token sampled from the residual ``norm(max(0, p_n - q_n))`` at the first rejection,
or, when all ``gamma`` drafts are accepted, a *bonus* token sampled from ``p_gamma`` (the
target's prediction after the last draft, computed in the same forward pass). This is the
standard algorithm of Leviathan et al. / Chen et al.; the output follows ``p`` exactly.

Greedy (temperature 0) is the exact special case with one-hot ``p`` and ``q``: a draft token is
accepted iff it equals the target's argmax, and the recovered/bonus token is the argmax.

Randomness is passed in (uniforms and exponential noise) so these functions are deterministic;
callers derive the noise from a per-session seed and the round's sequence number, which makes a
re-verification after a redelivery or failover produce the identical verdict.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

GREEDY_EPSILON = 1e-5
"""Temperatures at or below this are treated as greedy decoding."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-session sampling parameters (the target's filter; the draft uses the same)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_EPSILON


def filter_logits(
    logits: torch.Tensor,  # [N, V] float
    temperature: float,
    top_k: int,
    top_p: float,
) -> torch.Tensor:  # [N, V] float32 probabilities, rows sum to 1
    """Temperature, then top-k, then top-p (nucleus) filtering; returns probabilities.

    Ties at the top-k / top-p boundary are broken by token id (stable sort), so the kept set is a
    deterministic function of the logits.
    """
    scaled = logits.float() / max(temperature, GREEDY_EPSILON)
    vocab = scaled.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep a token if the mass before it is below top_p (so the first token is always kept).
        drop_sorted = (cumulative - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


@dataclass(frozen=True)
class SparseDistribution:
    """An exact sparse distribution: the draft samples from it and sends it as it is."""

    ids: np.ndarray  # [K] uint32, distinct
    probs: np.ndarray  # [K] float32, > 0, normalised in float64 by ``normalised()``

    def normalised(self) -> np.ndarray:  # [K] float64
        """The probabilities both sides use: float32 wire values renormalised in float64."""
        p = self.probs.astype(np.float64)
        return p / p.sum()


def sparse_draft_distribution(
    probs: torch.Tensor,  # [V] float, a filtered distribution (zeros outside its support)
    max_support: int,
) -> SparseDistribution:
    """Truncate a distribution to its ``max_support`` most likely tokens, as sent on the wire.

    The result is the distribution the edge then samples from, so the verifier knows ``q``
    exactly, including the tokens the truncation removed (probability zero).
    """
    k = min(max_support, int((probs > 0).sum().item()))
    values, ids = torch.topk(probs.float(), max(k, 1))
    keep = values > 0
    ids_np = ids[keep].to(torch.int64).numpy().astype(np.uint32)
    probs_np = values[keep].numpy().astype(np.float32)
    keep_np = probs_np > 0  # float32 rounding can underflow tiny values
    return SparseDistribution(ids=ids_np[keep_np], probs=probs_np[keep_np])


def sample_sparse(dist: SparseDistribution, generator: torch.Generator) -> int:
    """Sample one token id from exactly the distribution that goes on the wire."""
    p = torch.from_numpy(dist.normalised())
    index = int(torch.multinomial(p, 1, generator=generator).item())
    return int(dist.ids[index])


def round_generator(seed: int, seq: int, stream: str) -> torch.Generator:
    """A CPU generator for one round, keyed by (session seed, round sequence number, stream).

    Stateless keying (rather than one generator per session) makes the draws of a round
    independent of which worker runs it and how often it is retried.
    """
    digest = hashlib.blake2b(f"{seed}:{seq}:{stream}".encode(), digest_size=8).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return generator


@dataclass(frozen=True)
class RoundNoise:
    """The random draws one session's verification consumes."""

    uniforms: torch.Tensor  # [gamma] float32 in [0, 1): acceptance tests
    exponentials: torch.Tensor  # [V] float32, Exp(1): one categorical draw via argmax(p / E)


def draw_round_noise(seed: int, seq: int, gamma: int, vocab: int) -> RoundNoise:
    generator = round_generator(seed, seq, "verify")
    uniforms = torch.rand(gamma, generator=generator)
    exponentials = torch.empty(vocab).exponential_(generator=generator)
    return RoundNoise(uniforms=uniforms, exponentials=exponentials)


@dataclass(frozen=True)
class RejectionResult:
    num_accepted: torch.Tensor  # [B] int64, 0..num_draft
    next_token: torch.Tensor  # [B] int64, the recovered or bonus token


def rejection_sample(
    target_probs: torch.Tensor,  # [B, G + 1, V] float32; row j is p after j drafts
    draft_token_ids: torch.Tensor,  # [B, G] int64, padded past num_draft
    num_draft: torch.Tensor,  # [B] int64, 0..G
    draft_token_q: torch.Tensor,  # [B, G] float32, q_j(d_j); ignored for greedy rows
    draft_support_ids: torch.Tensor,  # [B, G, K] int64, q's support, padded with 0
    draft_support_probs: torch.Tensor,  # [B, G, K] float32, q's probabilities, padded with 0
    uniforms: torch.Tensor,  # [B, G] float32 in [0, 1)
    exponentials: torch.Tensor,  # [B, V] float32, Exp(1) noise
    greedy: torch.Tensor,  # [B] bool
) -> RejectionResult:
    """Verify a batch of drafts against one target pass; see the module docstring.

    Greedy rows ignore ``target_probs`` values except for their argmax, and ignore q and noise.
    """
    batch, max_draft = draft_token_ids.shape
    positions = torch.arange(max_draft).expand(batch, max_draft)
    in_draft = positions < num_draft.unsqueeze(1)  # [B, G]

    target_argmax = target_probs.argmax(dim=-1)  # [B, G + 1]
    p_of_draft = target_probs[:, :max_draft].gather(-1, draft_token_ids.unsqueeze(-1)).squeeze(-1)
    sampled_ok = uniforms * draft_token_q < p_of_draft  # u < p/q without dividing by q
    greedy_ok = draft_token_ids == target_argmax[:, :max_draft]
    accepted = torch.where(greedy.unsqueeze(1), greedy_ok, sampled_ok) & in_draft
    num_accepted = accepted.long().cumprod(dim=1).sum(dim=1)  # length of the accepted prefix

    next_token = torch.where(
        greedy,
        target_argmax.gather(1, num_accepted.unsqueeze(1)).squeeze(1),
        _sample_recovered_or_bonus(
            target_probs, num_accepted, num_draft, draft_support_ids, draft_support_probs,
            exponentials,
        ),
    )
    return RejectionResult(num_accepted=num_accepted, next_token=next_token)


def _sample_recovered_or_bonus(
    target_probs: torch.Tensor,  # [B, G + 1, V]
    num_accepted: torch.Tensor,  # [B]
    num_draft: torch.Tensor,  # [B]
    draft_support_ids: torch.Tensor,  # [B, G, K]
    draft_support_probs: torch.Tensor,  # [B, G, K]
    exponentials: torch.Tensor,  # [B, V]
) -> torch.Tensor:  # [B] int64
    """Sample from ``norm(max(0, p_n - q_n))`` after a rejection, or from ``p_n`` (bonus)."""
    batch, _vocab = exponentials.shape
    rows = torch.arange(batch)
    p = target_probs[rows, num_accepted]  # [B, V]
    if draft_support_ids.shape[1] == 0:  # nobody drafted anything: every row is a bonus
        return (p / exponentials).argmax(dim=-1)
    rejected = num_accepted < num_draft  # [B]
    position = num_accepted.clamp(max=draft_support_ids.shape[1] - 1)
    q_ids = draft_support_ids[rows, position]  # [B, K]
    q_probs = draft_support_probs[rows, position] * rejected.unsqueeze(1)  # zero q for bonus rows
    residual = p.scatter_add(-1, q_ids, -q_probs.to(p.dtype)).clamp(min=0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    # A rejection implies residual mass > 0 in exact arithmetic; guard against rounding.
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p)
    return (residual / exponentials).argmax(dim=-1)


def apply_stop_rules(
    new_tokens: list[int],
    generated_so_far: int,
    stop_token_ids: frozenset[int],
    max_new_tokens: int,
) -> tuple[list[int], str | None]:
    """Cut a round's new tokens at the first stop token (kept) or at ``max_new_tokens``.

    Returns the tokens to commit and the finish reason (``"stop"``, ``"length"`` or ``None``).
    Both the verifier and the edge apply this, so they agree on the output to the token.
    """
    room = max_new_tokens - generated_so_far
    for index, token in enumerate(new_tokens[:room]):
        if token in stop_token_ids:
            return new_tokens[: index + 1], "stop"
    kept = new_tokens[:room]
    return kept, ("length" if generated_so_far + len(kept) >= max_new_tokens else None)
