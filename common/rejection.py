"""Speculative verification of a whole batch, flat and ragged, on the logits' device.

The layout is vLLM's rejection sampler's: the target rows of all sessions stay one
``[T, V]`` tensor, ``T = sum(gamma_b + 1)``, with offsets. Greedy sessions take the argmax of
their raw logits (no probabilities at all; a batch of only greedy sessions is one argmax).
Sampled sessions are filtered together with per-row temperature/top-k/top-p
(``common.nucleus``) and test ``u * q(d) < p(d)`` on their draft rows. Two float32 sums per row
(its mass, and the mass above the drafted token) bound ``p(d)`` tightly enough to decide almost
every test without finding the top-p cut; the few rows they leave open, and every session's final
row (the recovered/bonus draw, one inverse-CDF draw from one uniform), get their exact kept set,
compacted to a few percent of the vocabulary (``common.nucleus.kept_tokens``), with float64
sums. See ``common.sampling`` for the algorithm and the notation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.nucleus import SORT_VOCAB, Kept, apply_top_k, kept_tokens, scaled_exp


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
        argmax = row_argmax(logits)
        accepted.copy_(argmax == draft_ids)
        return argmax
    argmax = torch.full((logits.shape[0],), -1, dtype=torch.long, device=logits.device)
    if rows.size:
        index = torch.from_numpy(rows).to(logits.device)
        chosen = row_argmax(logits.index_select(0, index))  # [Tg]
        argmax[index] = chosen
        accepted[index] = chosen == draft_ids[index]
    return argmax


ARGMAX_CHUNK = 128


def row_argmax(x: torch.Tensor) -> torch.Tensor:  # [R, V] -> [R] int64
    """``x.argmax(-1)`` (the first index of each row's maximum), in two levels on a CPU: the
    maxima of 128-wide chunks (a vectorised reduction), then the first chunk holding the row's
    maximum, then the first index inside it. CPU ``argmax`` is not vectorised: about 5x slower
    than ``amax`` over a 128,256-token vocabulary."""
    rows, vocab = x.shape
    if x.device.type != "cpu" or vocab < 8 * ARGMAX_CHUNK:
        return x.argmax(dim=-1)
    whole = vocab - vocab % ARGMAX_CHUNK
    chunks = x[:, :whole].unflatten(1, (-1, ARGMAX_CHUNK))  # [R, n, C], a view
    best = chunks.amax(dim=-1)  # [R, n]
    chunk = best.argmax(dim=-1)  # [R] first chunk holding the maximum
    inside = chunks[torch.arange(rows, device=x.device), chunk].argmax(dim=-1)  # [R]
    index = chunk * ARGMAX_CHUNK + inside
    if whole < vocab:  # the tail wins only with a strictly larger value (earlier index wins ties)
        tail = x[:, whole:]
        later = tail.amax(dim=-1) > best.gather(1, chunk.unsqueeze(1)).squeeze(1)
        index = torch.where(later, whole + tail.argmax(dim=-1), index)
    return index


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


SLACK = 1e-4
"""Relative error allowed for a float32 sum over a row (the acceptance bounds' margin)."""


@dataclass
class _Sampled:
    """The sampled sessions' rows: ``e`` (scaled exp, top-k applied) and per-row parameters."""

    batch: FlatRound
    rows: np.ndarray  # [Ts] flat rows of sampled sessions
    index: torch.Tensor  # [Ts] the same, on the device
    e: torch.Tensor  # [Ts, V] float32
    top_p: torch.Tensor  # [Ts] float32
    scratch: torch.Tensor | None  # [Ts, V] float32 to reuse

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
            out = workspace[:size].view(rows.size, vocab)
            scratch = workspace[size:2 * size].view(rows.size, vocab)
        source = logits if rows.size == logits.shape[0] else logits.index_select(0, index)
        e = scaled_exp(source, torch.from_numpy(batch.temperature[session]), out)
        apply_top_k(e, torch.from_numpy(batch.top_k[session]))
        return cls(batch, rows, index, e, torch.from_numpy(batch.top_p[session]).to(device), scratch)

    def accept(self, draft_ids: torch.Tensor, accepted: torch.Tensor) -> None:
        """``u * q(d) < p(d)`` for every sampled row: float32 bounds first, exact where open."""
        device = self.e.device
        d = draft_ids[self.index]  # [Ts]
        e_d = self.e.gather(1, d.unsqueeze(1)).squeeze(1)  # [Ts] float32
        uq = torch.from_numpy(self.batch.uniforms[self.rows] * self.batch.draft_q[self.rows]
                              .astype(np.float64)).to(device)  # [Ts]
        if self.e.shape[-1] <= SORT_VOCAB:  # small vocabulary: every row's exact cut is cheap
            result, unsure = torch.zeros_like(uq, dtype=torch.bool), torch.ones_like(uq, dtype=torch.bool)
        else:
            result, unsure = self._bounds(e_d, uq)
        if bool(unsure.any()):
            pick = torch.nonzero(unsure).squeeze(1)
            result[pick] = uq[pick] < self._exact_p(pick, e_d[pick].double())
        accepted[self.index] = result

    def _bounds(self, e_d: torch.Tensor, uq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(accepted, undecided) ``[Ts]`` from float32 sums, no cut: with ``Z`` the row's mass and
        ``A`` the mass above ``e(d)``, ``d`` is kept iff ``A < top_p * Z``, and then
        ``e(d) / Z <= p(d) <= e(d) / (top_p * Z)`` (the kept mass lies between)."""
        e_d64 = e_d.double()
        whole = self.e.sum(dim=-1).double()  # [Ts]
        above = _mass_above(self.e, e_d, self.scratch).double()  # [Ts]
        cut = self.top_p < 1.0
        target = self.top_p.double() * whole
        kept_sure = ~cut | (above < target * (1 - SLACK))
        dropped_sure = cut & (above > target * (1 + SLACK))
        kept_mass_low = torch.where(cut, target, whole) * (1 - SLACK)
        yes = kept_sure & (uq * whole * (1 + SLACK) < e_d64)
        no = dropped_sure | (uq * kept_mass_low >= e_d64)
        return yes, ~(yes | no)

    def _exact_p(self, pick: torch.Tensor, e_d: torch.Tensor) -> torch.Tensor:  # [n] float64
        """``p(d)`` exactly on the rows ``pick`` (their kept sets, float64 sums)."""
        p = torch.zeros_like(e_d)
        for rows, kept in kept_tokens(self.e.index_select(0, pick), self.top_p[pick]):
            mine = e_d[rows]
            p[rows] = torch.where(mine >= kept.threshold.double(), mine / kept.total, 0.0)
        return p

    def draw_final(self, sessions: np.ndarray, final_row: torch.Tensor,
                   num_accepted: torch.Tensor) -> torch.Tensor:  # [Bs] int64
        """Sample ``norm(max(0, p_n - q_n))`` after a rejection, else ``p_n`` (bonus), by
        inverse CDF with each session's final uniform, over each row's kept set."""
        batch, device = self.batch, self.e.device
        local_of_row = torch.full((int(batch.offsets[-1]),), -1, dtype=torch.long, device=device)
        local_of_row[self.index] = torch.arange(self.rows.size, device=device)
        sessions_t = torch.from_numpy(sessions).to(device)
        rows = final_row[sessions_t]  # [Bs] flat rows
        local = local_of_row[rows]  # [Bs] rows of e
        rejected = num_accepted[sessions_t] < torch.from_numpy(batch.num_draft[sessions]).to(device)
        u = torch.from_numpy(batch.uniforms[batch.offsets[1:][sessions] - 1]).to(device)  # [Bs]
        tokens = torch.empty(sessions.size, dtype=torch.long, device=device)
        for part, kept in kept_tokens(self.e.index_select(0, local), self.top_p[local]):
            e = kept.e
            if batch.support_rows.size and bool(rejected[part].any()):
                e = _residual(kept, batch, rows[part], rejected[part])
            cdf = e.cumsum(dim=-1, dtype=torch.float64)  # [R, K]
            end = cdf[:, -1:]
            target = torch.minimum(u[part].unsqueeze(1) * end,
                                   torch.nextafter(end, torch.zeros_like(end)))
            entry = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=e.shape[1] - 1)
            tokens[part] = kept.token_at(entry)
        return tokens


def _mass_above(e: torch.Tensor, e_d: torch.Tensor,  # e [R, V] float32, e_d [R]
                scratch: torch.Tensor | None) -> torch.Tensor:  # [R] float32
    """Each row's mass strictly above its ``e_d`` (float32 sums; ``scratch`` [R, V] reused)."""
    above = torch.gt(e, e_d.unsqueeze(1), out=scratch) if scratch is not None else \
        (e > e_d.unsqueeze(1)).float()
    return above.mul_(e).sum(dim=-1)


def _residual(kept: Kept, batch: FlatRound, rows: torch.Tensor,
              rejected: torch.Tensor) -> torch.Tensor:  # [R, K] float32
    """``max(0, p - q)`` in ``e``'s scale (``e - q * total``) on the rows of rejected sessions;
    rows where that leaves no mass keep ``p`` (a rejection implies mass > 0 in exact
    arithmetic: the guard is against rounding)."""
    device = kept.e.device
    slot_of_row = torch.full((int(batch.offsets[-1]),), -1, dtype=torch.long, device=device)
    slot_of_row[rows[rejected]] = torch.nonzero(rejected).squeeze(1)
    slot = slot_of_row[torch.from_numpy(batch.support_rows).to(device)]  # [S] -1: not a final row
    hit = slot >= 0
    slot, ids = slot[hit], torch.from_numpy(batch.support_ids).to(device)[hit]
    q = (torch.from_numpy(batch.support_probs.astype(np.float64)).to(device)[hit]
         * kept.total[slot]).float()  # [S'] q in e's scale
    entry, held = kept.locate(slot, ids)  # tokens outside the kept set: max(0, 0 - q) = 0
    residual = kept.e.clone()
    residual.view(-1).index_put_((entry[held],), -q[held], accumulate=True)
    residual.clamp_(min=0.0)
    use = rejected & (residual.sum(dim=-1, dtype=torch.float64) > 0)
    return torch.where(use.unsqueeze(1), residual, kept.e)
