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

    The one definition both sides use (the verifier through ``filter_rows``):
    ``e = exp((logits - max) / T)``; top-k keeps ``e >= `` the k-th largest ``e``; top-p keeps,
    in descending order, every token whose mass before it is below ``top_p`` of the total, and
    then every token tied with the last kept one. Ties are kept together, so the kept set is a
    function of the values alone (no tie-break by id).
    """
    rows = logits.shape[0]
    e = scaled_exp(logits, torch.full((rows,), max(temperature, GREEDY_EPSILON)))
    filter_rows(e, torch.full((rows,), top_k, dtype=torch.long),
                torch.full((rows,), top_p, dtype=torch.float32))
    return (e / e.sum(dim=-1, keepdim=True, dtype=torch.float64)).float()


def scaled_exp(
    logits: torch.Tensor,  # [R, V] any float dtype
    temperature: torch.Tensor,  # [R] float, > 0
    out: torch.Tensor | None = None,  # [R, V] float32 workspace to reuse (CPU: no page faults)
) -> torch.Tensor:  # [R, V] float32, exp((logits - row max) / T); the row max maps to 1.0
    e = out if out is not None else torch.empty(logits.shape, dtype=torch.float32,
                                                 device=logits.device)
    e.copy_(logits)
    e.sub_(e.amax(dim=-1, keepdim=True))
    e.div_(temperature.to(e.device, torch.float32).unsqueeze(1))
    return e.exp_()


def filter_rows(
    e: torch.Tensor,  # [R, V] float32 from ``scaled_exp``; filtered IN PLACE
    top_k: torch.Tensor,  # [R] int64, 0 = off
    top_p: torch.Tensor,  # [R] float32, 1 = off
) -> None:
    """Zero every token outside each row's top-k / top-p set (see ``filter_logits``).

    No full-vocabulary sort: top-k is one ``topk`` of the largest k; the top-p cut-off is found
    from a histogram of the float bits (bucket order is value order for non-negative floats),
    then sorted exactly inside the one bucket that holds it.
    """
    vocab = e.shape[-1]
    top_k, top_p = top_k.to(e.device), top_p.to(e.device)
    k_rows = (top_k > 0) & (top_k < vocab)
    if bool(k_rows.any()):
        widest = int(top_k[k_rows].max())
        largest = torch.topk(e, widest, dim=-1).values  # [R, K] descending
        kth = largest.gather(1, (top_k.clamp(1, widest) - 1).unsqueeze(1)).squeeze(1)  # [R]
        _zero_below(e, torch.where(k_rows, kth, torch.zeros_like(kth)))
    p_rows = top_p < 1.0
    if bool(p_rows.any()):
        rows = torch.nonzero(p_rows).squeeze(1)
        if rows.numel() == e.shape[0]:
            _zero_below(e, _top_p_threshold(e, top_p))
        else:
            sub = e.index_select(0, rows)
            _zero_below(sub, _top_p_threshold(sub, top_p.index_select(0, rows)))
            e.index_copy_(0, rows, sub)


def _zero_below(e: torch.Tensor, threshold: torch.Tensor) -> None:  # e [R, V], threshold [R]
    e.masked_fill_(e < threshold.unsqueeze(1), 0.0)


_BUCKETS = (0x3F800000 >> 16) + 1  # float bits >> 16 of values in [0, 1]: 8 mantissa bits


def _top_p_threshold(
    e: torch.Tensor,  # [R, V] float32 in [0, 1]
    top_p: torch.Tensor,  # [R] float32
) -> torch.Tensor:  # [R] float32: the row keeps ``e >= threshold``
    rows = e.shape[0]
    bucket = torch.bitwise_right_shift(e.view(torch.int32), 16).long()  # [R, V] value order
    hist = torch.zeros(rows, _BUCKETS, dtype=torch.float32, device=e.device)
    hist.scatter_add_(1, bucket, e)  # [R, NB] mass per bucket
    down = hist.flip(1)  # [R, NB] descending value order
    reached = down.cumsum(1)  # [R, NB] mass of this bucket and every larger one
    target = top_p * reached[:, -1]  # [R]
    # [R] descending index of the bucket that holds the cut
    first = (reached < target.unsqueeze(1)).sum(1).clamp(max=_BUCKETS - 1)
    before = (reached - down).gather(1, first.unsqueeze(1)).squeeze(1)  # [R] mass above it
    cut = (_BUCKETS - 1 - first).unsqueeze(1)  # [R, 1]
    inside = bucket == cut  # [R, V]
    count = inside.sum(1)  # [R]
    width = int(count.max())
    values = torch.topk(e * inside, width, dim=-1).values  # [R, W] descending, the cut bucket
    mass_before = before.unsqueeze(1) + values.cumsum(1) - values  # [R, W]
    within = torch.arange(width, device=e.device).unsqueeze(0) < count.unsqueeze(1)
    kept = ((mass_before < target.unsqueeze(1)) & within).sum(1).clamp(min=1)  # [R]
    return values.gather(1, (kept - 1).unsqueeze(1)).squeeze(1)


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


@dataclass(frozen=True)
class FlatRound:
    """One round of B sessions, flat and ragged (vLLM's rejection-sampler layout).

    Session ``b`` owns rows ``offsets[b] .. offsets[b + 1] - 1``: ``gamma_b + 1`` target rows;
    row ``offsets[b] + j`` predicts the token after ``j`` drafts. Arrays are host numpy; the
    maths runs on the logits' device.
    """

    offsets: np.ndarray  # [B + 1] int64
    draft_ids: np.ndarray  # [T] int64: d_{j+1} at row offsets[b] + j (j < gamma_b), 0 on last rows
    draft_q: np.ndarray  # [T] float32: q_j(d_j), 1 where unused (greedy, last rows)
    support_rows: np.ndarray  # [S] int64: the flat row of each sparse q entry
    support_ids: np.ndarray  # [S] int64
    support_probs: np.ndarray  # [S] float32, normalised per row
    greedy: np.ndarray  # [B] bool
    temperature: np.ndarray  # [B] float32
    top_k: np.ndarray  # [B] int64
    top_p: np.ndarray  # [B] float32
    uniforms: np.ndarray  # [T] float64: acceptance u at draft rows, the final draw at last rows

    @property
    def num_draft(self) -> np.ndarray:  # [B] int64
        return np.diff(self.offsets) - 1


@dataclass(frozen=True)
class RejectionResult:
    num_accepted: torch.Tensor  # [B] int64, 0..num_draft
    next_token: torch.Tensor  # [B] int64, the recovered or bonus token


def verify_round(
    logits: torch.Tensor,  # [T, V] the target's rows, T = sum(gamma_b + 1)
    batch: FlatRound,
    workspace: torch.Tensor | None = None,  # [>= T_sampled * V] float32 scratch to reuse
) -> RejectionResult:
    """Verify every session's draft against one target pass; see the module docstring.

    Greedy sessions take the argmax of their raw logits (no probabilities at all); sampled
    sessions are filtered together (per-row temperature/top-k/top-p), test ``u * q < p`` on
    their draft rows, and draw the recovered/bonus token by inverse CDF from one uniform.
    """
    device, vocab = logits.device, logits.shape[-1]
    offsets, gamma = batch.offsets, batch.num_draft
    sessions = gamma.size
    session_of_row = np.repeat(np.arange(sessions), gamma + 1)  # [T]
    greedy_rows = np.flatnonzero(batch.greedy[session_of_row])  # [Tg]
    sampled_rows = np.flatnonzero(~batch.greedy[session_of_row])  # [Ts]
    draft_ids = torch.from_numpy(batch.draft_ids).to(device)  # [T]
    accepted = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)  # [T]
    argmax = _greedy_rows(logits, greedy_rows, draft_ids, accepted)  # [T] (-1: sampled rows)
    probs = _sampled_rows(logits, batch, sampled_rows, session_of_row, draft_ids, accepted,
                          workspace)  # [Ts, V] kept mass (unnormalised), [Ts] totals
    num_accepted = _accepted_prefix(accepted, offsets, gamma)  # [B]
    final_row = torch.from_numpy(offsets[:-1]).to(device) + num_accepted  # [B]
    next_token = argmax.gather(0, final_row)  # [B]; replaced below for sampled sessions
    if probs is not None:
        sampled = np.flatnonzero(~batch.greedy)
        next_token[sampled] = _draw_final(probs, batch, sampled, sampled_rows, final_row,
                                          num_accepted, vocab)
    return RejectionResult(num_accepted=num_accepted, next_token=next_token)


def _greedy_rows(logits: torch.Tensor, rows: np.ndarray, draft_ids: torch.Tensor,
                 accepted: torch.Tensor) -> torch.Tensor:  # [T] int64 argmax, -1 elsewhere
    if rows.size == logits.shape[0]:  # all greedy: the fast path, one argmax, no copies
        argmax = logits.argmax(dim=-1)
        accepted.copy_(argmax == draft_ids)
        return argmax
    argmax = torch.full((logits.shape[0],), -1, dtype=torch.long, device=logits.device)
    if rows.size:
        index = torch.from_numpy(rows).to(logits.device)
        chosen = logits.index_select(0, index).argmax(dim=-1)  # [Tg]
        argmax[index] = chosen
        accepted[index] = chosen == draft_ids[index]
    return argmax


def _sampled_rows(
    logits: torch.Tensor, batch: FlatRound, rows: np.ndarray, session_of_row: np.ndarray,
    draft_ids: torch.Tensor, accepted: torch.Tensor, workspace: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Filter all sampled rows at once and run their acceptance tests ``u * q < p``."""
    if not rows.size:
        return None
    device, vocab = logits.device, logits.shape[-1]
    index = torch.from_numpy(rows).to(device)  # [Ts]
    session = session_of_row[rows]  # [Ts]
    out = workspace[: rows.size * vocab].view(rows.size, vocab) if workspace is not None else None
    source = logits if rows.size == logits.shape[0] else logits.index_select(0, index)
    e = scaled_exp(source, torch.from_numpy(batch.temperature[session]), out)  # [Ts, V]
    filter_rows(e, torch.from_numpy(batch.top_k[session]), torch.from_numpy(batch.top_p[session]))
    total = e.sum(dim=-1, dtype=torch.float64)  # [Ts]
    p_of_draft = e.gather(1, draft_ids[index].unsqueeze(1)).squeeze(1) / total  # [Ts] float64
    u = torch.from_numpy(batch.uniforms[rows]).to(device)
    q = torch.from_numpy(batch.draft_q[rows].astype(np.float64)).to(device)
    accepted[index] = u * q < p_of_draft
    return e, total


def _accepted_prefix(accepted: torch.Tensor, offsets: np.ndarray,
                     gamma: np.ndarray) -> torch.Tensor:  # [B] int64
    """Length of each session's accepted prefix, via a padded ``[B, G]`` view of the flat rows."""
    widest = int(gamma.max()) if gamma.size else 0
    if widest == 0:
        return torch.zeros(gamma.size, dtype=torch.long, device=accepted.device)
    j = np.arange(widest)
    index = offsets[:-1, None] + np.minimum(j, gamma[:, None])  # [B, G] flat rows
    in_draft = torch.from_numpy(j < gamma[:, None]).to(accepted.device)  # [B, G]
    padded = accepted[torch.from_numpy(index).to(accepted.device)] & in_draft
    return padded.long().cumprod(dim=1).sum(dim=1)


def _draw_final(
    probs: tuple[torch.Tensor, torch.Tensor], batch: FlatRound, sessions: np.ndarray,
    sampled_rows: np.ndarray, final_row: torch.Tensor, num_accepted: torch.Tensor, vocab: int,
) -> torch.Tensor:  # [Bs] int64
    """Sample ``norm(max(0, p_n - q_n))`` after a rejection, else ``p_n`` (bonus), by inverse CDF."""
    e, total = probs
    device = e.device
    local_of_row = np.full(batch.offsets[-1], -1, dtype=np.int64)
    local_of_row[sampled_rows] = np.arange(sampled_rows.size)
    local_of_row_t = torch.from_numpy(local_of_row).to(device)
    rows = final_row[torch.from_numpy(sessions).to(device)]  # [Bs] flat rows
    local = local_of_row_t[rows]  # [Bs] rows of e
    p = e.index_select(0, local).double() / total[local].unsqueeze(1)  # [Bs, V]
    rejected = num_accepted[torch.from_numpy(sessions).to(device)] < torch.from_numpy(
        batch.num_draft[sessions]).to(device)  # [Bs]
    if batch.support_rows.size:
        slot_of_row = torch.full((int(batch.offsets[-1]),), -1, dtype=torch.long, device=device)
        slot_of_row[rows[rejected]] = torch.nonzero(rejected).squeeze(1)
        support_rows = torch.from_numpy(batch.support_rows).to(device)
        slot = slot_of_row[support_rows]  # [S] the session slot whose final row it is, or -1
        hit = slot >= 0
        q = torch.from_numpy(batch.support_probs.astype(np.float64)).to(device)
        ids = torch.from_numpy(batch.support_ids).to(device)
        residual = p.index_put((slot[hit], ids[hit]), -q[hit], accumulate=True).clamp_(min=0.0)
        mass = residual.sum(dim=-1, keepdim=True)
        # A rejection implies residual mass > 0 in exact arithmetic; guard against rounding.
        p = torch.where(mass > 0, residual, p)
    cdf = p.cumsum(dim=-1)  # [Bs, V] float64
    end = cdf[:, -1:]
    u = torch.from_numpy(batch.uniforms[batch.offsets[1:][sessions] - 1]).to(device)
    target = torch.minimum(u.unsqueeze(1) * end, torch.nextafter(end, torch.zeros_like(end)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=vocab - 1)


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
