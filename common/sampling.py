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

Randomness is passed in (one uniform per acceptance test and one for the final draw, an
inverse-CDF draw) so these functions are deterministic; callers derive the uniforms from a
per-session seed and the round's sequence number (``round_uniforms``, counter-based: O(gamma)
draws, not O(V)), which makes a re-verification after a redelivery or failover produce the
identical verdict.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.nucleus import filter_rows, scaled_exp

GREEDY_EPSILON = 1e-5
"""Temperatures at or below this are treated as greedy decoding."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-session sampling parameters (the target's filter; the draft uses the same)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @classmethod
    def of(cls, spec: Any) -> SamplingParams:
        """The parameters of a session's ``SamplingSpec`` (common.wire): the one place they are read."""
        return cls(spec.temperature, spec.top_p, spec.top_k, spec.seed)

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

    The one definition both sides use (see ``common.nucleus``): ties at the top-k / top-p
    boundary are kept together, so the kept set is a deterministic function of the logits.
    """
    rows = logits.shape[0]
    e = scaled_exp(logits, torch.full((rows,), max(temperature, GREEDY_EPSILON)))
    return filter_rows(e, torch.full((rows,), top_k, dtype=torch.long),
                       torch.full((rows,), top_p, dtype=torch.float32))


@dataclass(frozen=True)
class SparseDistribution:
    """An exact sparse distribution: the draft samples from it and sends it as it is."""

    ids: np.ndarray  # [K] uint32, distinct
    probs: np.ndarray  # [K] float32, > 0, normalised in float64 by ``normalised()``

    def normalised(self) -> np.ndarray:  # [K] float64
        """The probabilities both sides use: float32 wire values renormalised in float64."""
        return normalised_supports(self.probs, np.array([self.probs.size]))


def normalised_supports(probs: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Sparse supports' float32 wire probabilities (concatenated, ``sizes`` entries each)
    renormalised in float64, each support to sum 1: the one normalisation of ``q``, used by the
    edge that samples from it and the verifier that tests it (the same sums in the same order,
    so the same bits on both sides)."""
    raw = probs.astype(np.float64)
    if not raw.size:
        return raw
    starts = np.concatenate(([0], np.cumsum(sizes)))[:-1]
    return raw / np.repeat(np.add.reduceat(raw, starts), sizes)


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


_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
FINAL_DRAW = 1 << 32
"""Counter of a round's last draw (the recovered/bonus token); acceptance test j uses j."""


def _splitmix64(x: np.ndarray) -> np.ndarray:  # [...] uint64 -> [...] uint64, wrapping
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def round_uniforms(
    seeds: list[int],  # [B] per-session seeds
    seqs: list[int],  # [B] round sequence numbers
    num_draft: np.ndarray,  # [B] int64 gamma_b
) -> np.ndarray:  # [sum(gamma_b + 1)] float64 in [0, 1)
    """Counter-based uniforms keyed by (seed, seq, counter): O(gamma) draws per round.

    Session ``b``'s rows are ``gamma_b`` acceptance uniforms (counters 0 .. gamma_b - 1) then
    the final draw (counter ``FINAL_DRAW``), so a draw depends only on its key, never on the
    batch it was verified in or on how often the round was retried.
    """
    keys = _splitmix64(np.array([s & _MASK64 for s in seeds], dtype=np.uint64))
    keys = _splitmix64(keys ^ np.array([q & _MASK64 for q in seqs], dtype=np.uint64))
    rows = num_draft + 1
    starts = np.cumsum(rows) - rows
    local = np.arange(int(rows.sum())) - np.repeat(starts, rows)
    counters = np.where(local < np.repeat(num_draft, rows), local, FINAL_DRAW).astype(np.uint64)
    with np.errstate(over="ignore"):
        bits = _splitmix64(np.repeat(keys, rows) + counters * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


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
