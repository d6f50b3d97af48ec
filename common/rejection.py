"""Speculative verification of a whole batch, flat and ragged, on the logits' device.

The layout is vLLM's rejection sampler's: the target rows of all sessions stay one
``[T, V]`` tensor, ``T = sum(gamma_b + 1)``, with offsets. Greedy sessions take the argmax of
their raw logits (no probabilities at all; a batch of only greedy sessions is one argmax).
Sampled sessions are filtered together with per-row temperature/top-k/top-p
(``common.nucleus``) and test ``u * q(d) < p(d)`` on their draft rows: a float32 histogram of
each row bounds the kept mass, which decides almost every test; the few rows it cannot decide,
and every session's final row (the recovered/bonus draw, one inverse-CDF draw from one uniform),
get the exact float64 cut. See ``common.sampling`` for the algorithm and the notation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.nucleus import SLACK, SORT_VOCAB, apply_top_k, cut_bounds, exact_cut, scaled_exp


@dataclass(frozen=True)
class FlatRound:
    """One round of B sessions. Session ``b`` owns rows ``offsets[b] .. offsets[b + 1] - 1``:
    ``gamma_b + 1`` target rows; row ``offsets[b] + j`` predicts the token after ``j`` drafts.
    Host numpy arrays; the maths runs on the logits' device."""

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
    logits: torch.Tensor,  # [T, V] the target's rows
    batch: FlatRound,
    workspace: torch.Tensor | None = None,  # [>= 2 * T_sampled * V] float32 scratch to reuse
) -> RejectionResult:
    device = logits.device
    offsets, gamma = batch.offsets, batch.num_draft
    session_of_row = np.repeat(np.arange(gamma.size), gamma + 1)  # [T]
    greedy_rows = np.flatnonzero(batch.greedy[session_of_row])  # [Tg]
    draft_ids = torch.from_numpy(batch.draft_ids).to(device)  # [T]
    accepted = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)  # [T]
    argmax = _greedy_rows(logits, greedy_rows, draft_ids, accepted)  # [T] (-1: sampled rows)
    sampled = _Sampled.build(logits, batch, session_of_row, workspace)
    if sampled is not None:
        sampled.accept(draft_ids, accepted)
    num_accepted = _accepted_prefix(accepted, offsets, gamma)  # [B]
    final_row = torch.from_numpy(offsets[:-1]).to(device) + num_accepted  # [B]
    next_token = argmax.gather(0, final_row)  # [B]; sampled sessions' are replaced below
    if sampled is not None:
        sessions = np.flatnonzero(~batch.greedy)
        next_token[torch.from_numpy(sessions).to(device)] = sampled.draw_final(
            sessions, final_row, num_accepted)
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


@dataclass
class _Sampled:
    """The sampled sessions' rows: ``e`` (scaled exp, top-k applied) and per-row parameters."""

    batch: FlatRound
    rows: np.ndarray  # [Ts] flat rows of sampled sessions
    index: torch.Tensor  # [Ts] the same, on the device
    e: torch.Tensor  # [Ts, V] float32
    top_p: torch.Tensor  # [Ts] float32
    scratch: torch.Tensor | None  # [Ts * V] int32 for the histogram's bins

    @classmethod
    def build(cls, logits: torch.Tensor, batch: FlatRound, session_of_row: np.ndarray,
              workspace: torch.Tensor | None) -> _Sampled | None:
        rows = np.flatnonzero(~batch.greedy[session_of_row])
        if not rows.size:
            return None
        device, vocab = logits.device, logits.shape[-1]
        index = torch.from_numpy(rows).to(device)
        session = session_of_row[rows]
        size = rows.size * vocab
        out, scratch = None, None
        if workspace is not None and workspace.numel() >= 2 * size:
            out, scratch = workspace[:size].view(rows.size, vocab), workspace[size:2 * size].view(torch.int32)
        source = logits if rows.size == logits.shape[0] else logits.index_select(0, index)
        e = scaled_exp(source, torch.from_numpy(batch.temperature[session]), out)
        apply_top_k(e, torch.from_numpy(batch.top_k[session]))
        return cls(batch, rows, index, e, torch.from_numpy(batch.top_p[session]).to(device), scratch)

    def accept(self, draft_ids: torch.Tensor, accepted: torch.Tensor) -> None:
        """``u * q(d) < e(d) / kept total`` for every sampled row, bounds first."""
        device = self.e.device
        d = draft_ids[self.index]  # [Ts]
        e_d = self.e.gather(1, d.unsqueeze(1)).squeeze(1).double()  # [Ts]
        uq = torch.from_numpy(self.batch.uniforms[self.rows] * self.batch.draft_q[self.rows]
                              .astype(np.float64)).to(device)  # [Ts]
        if self.e.shape[-1] <= SORT_VOCAB:  # small vocabulary: the exact cut is cheap
            threshold, kept = exact_cut(self.e, self.top_p)
            accepted[self.index] = uq < torch.where(e_d >= threshold.double(), e_d, 0.0) / kept
            return
        bounds = cut_bounds(self.e, self.top_p, self.scratch)
        filtered = self.top_p < 1.0
        bucket_d = torch.bitwise_right_shift(e_d.float().view(torch.int32), 16).long()
        low = bounds.target.double() * (1 - SLACK)
        high = bounds.reached.double() * (1 + SLACK)
        total = torch.where(filtered, high, bounds.total.double())  # upper bound of the kept mass
        sure_kept = ~filtered | (bucket_d > bounds.bucket)
        yes = sure_kept & (uq * total < e_d * (1 - SLACK))
        no = (filtered & (bucket_d < bounds.bucket)) | (uq * torch.where(filtered, low, total * (
            1 - 2 * SLACK)) >= e_d * (1 + SLACK))
        # A cut bucket whose edges sit within the slack of the target may be the wrong one.
        shaky = filtered & ((bounds.before.double() >= low) | (bounds.reached.double() * (1 - SLACK)
                                                               <= bounds.target.double()))
        unsure = shaky | ~(yes | no)
        result = yes & ~unsure
        if bool(unsure.any()):
            pick = torch.nonzero(unsure).squeeze(1)
            rows = self.e.index_select(0, pick)
            threshold, kept = exact_cut(rows, self.top_p[pick])
            p_d = torch.where(e_d[pick] >= threshold.double(), e_d[pick], 0.0) / kept
            result[pick] = uq[pick] < p_d
        accepted[self.index] = result

    def draw_final(self, sessions: np.ndarray, final_row: torch.Tensor,
                   num_accepted: torch.Tensor) -> torch.Tensor:  # [Bs] int64
        """Sample ``norm(max(0, p_n - q_n))`` after a rejection, else ``p_n`` (bonus), by
        inverse CDF with each session's final uniform."""
        batch, device, vocab = self.batch, self.e.device, self.e.shape[-1]
        local_of_row = torch.full((int(batch.offsets[-1]),), -1, dtype=torch.long, device=device)
        local_of_row[self.index] = torch.arange(self.rows.size, device=device)
        sessions_t = torch.from_numpy(sessions).to(device)
        rows = final_row[sessions_t]  # [Bs] flat rows
        local = local_of_row[rows]  # [Bs] rows of e
        e = self.e.index_select(0, local)  # [Bs, V] float32, this pass's copy
        threshold, total = exact_cut(e, self.top_p[local])
        e.masked_fill_(e < threshold.unsqueeze(1), 0.0)  # p = e / total, never materialised
        rejected = num_accepted[sessions_t] < torch.from_numpy(batch.num_draft[sessions]).to(device)
        if batch.support_rows.size:
            _subtract_draft(e, total, batch, rows, rejected)
        cdf = e.cumsum(dim=-1, dtype=torch.float64)  # [Bs, V]
        end = cdf[:, -1:]
        u = torch.from_numpy(batch.uniforms[batch.offsets[1:][sessions] - 1]).to(device)
        target = torch.minimum(u.unsqueeze(1) * end, torch.nextafter(end, torch.zeros_like(end)))
        return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=vocab - 1)


def _subtract_draft(e: torch.Tensor, total: torch.Tensor, batch: FlatRound, rows: torch.Tensor,
                    rejected: torch.Tensor) -> None:  # e [Bs, V] float32 IN PLACE, total [Bs]
    """``max(0, p - q)`` in ``e``'s scale (``e - q * total``) on the rows of rejected sessions;
    rows where that leaves no mass keep ``p`` (a rejection implies mass > 0 in exact
    arithmetic: the guard is against rounding)."""
    device = e.device
    slot_of_row = torch.full((int(batch.offsets[-1]),), -1, dtype=torch.long, device=device)
    slot_of_row[rows[rejected]] = torch.nonzero(rejected).squeeze(1)
    slot = slot_of_row[torch.from_numpy(batch.support_rows).to(device)]  # [S] -1: not a final row
    hit = slot >= 0
    slot, ids = slot[hit], torch.from_numpy(batch.support_ids).to(device)[hit]
    q = (torch.from_numpy(batch.support_probs.astype(np.float64)).to(device)[hit]
         * total[slot]).float()  # [S'] q in e's scale
    # Residual mass = sum(e) - sum over q's support of min(e, q).
    overlap = torch.zeros(e.shape[0], dtype=torch.float64, device=device).index_add_(
        0, slot, torch.minimum(e[slot, ids], q).double())
    keep = (e.sum(dim=-1, dtype=torch.float64) - overlap)[slot] > 0
    e.index_put_((slot[keep], ids[keep]), -q[keep], accumulate=True).clamp_(min=0.0)
