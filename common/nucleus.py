"""Temperature, top-k and top-p for many rows at once, with per-row parameters, without a sort.

The definition (the edge's ``filter_logits`` and the verifier share it):
    ``e = exp((logits - row max) / T)`` (float32; the max maps to 1.0);
    top-k keeps ``e >=`` the k-th largest ``e``;
    top-p keeps, in descending order, every token whose mass before it is below ``top_p`` of the
    row's total, then every token tied with the last kept one (ties are kept together, so the
    kept set is a function of the values alone);
    the probabilities are the kept ``e`` over their float64 sum.

A row is then two numbers: ``threshold`` (kept iff ``e >= threshold``) and ``total``. The top-p
cut is found from a histogram of the float bits (``bits >> 16``: the order of buckets is the
order of values for non-negative floats, 128 buckets per octave), then sorted exactly inside the
one bucket that holds it (small vocabularies just sort).

The verifier needs the kept set itself only on a few rows per pass (its final draws and the
acceptance tests its bounds leave open): ``kept_tokens`` gives it compacted. The float32
histogram places the cut to within a bucket; the tokens from the bucket below it up (the nucleus
and a sliver, a few percent of a real vocabulary at most) are gathered in vocabulary order,
sorted and cut with exact float64 running sums. That the candidates hold the cut is checked
exactly; if they do not (float32 sums misplaced it), the floor drops to ``(1 - top_p) * total / V``,
below which the cut can never lie, and a row too wide to compact stays dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

BUCKETS = (0x3F800000 >> 16) + 1  # bits >> 16 of floats in [0, 1]
GROUP = 128  # buckets per group in the two-level search (one octave)
GROUPS = -(-BUCKETS // GROUP)
STRIDE = GROUPS * GROUP  # histogram bins per row (the last few stay empty)
SORT_VOCAB = 4096  # at or below this vocabulary a row sort is cheaper than the histogram


def scaled_exp(
    logits: torch.Tensor,  # [R, V] any float dtype
    temperature: torch.Tensor,  # [R] float, > 0
    out: torch.Tensor | None = None,  # [R, V] float32 workspace to reuse (CPU: no page faults)
) -> torch.Tensor:  # [R, V] float32
    e = out if out is not None else torch.empty(logits.shape, dtype=torch.float32,
                                                 device=logits.device)
    if logits.dtype == torch.float32:  # one pass: subtract straight into the workspace
        torch.sub(logits, logits.amax(dim=-1, keepdim=True), out=e)
    else:  # bf16/fp16 logits: subtract in float32, as the definition says
        e.copy_(logits)
        e.sub_(e.amax(dim=-1, keepdim=True))
    e.div_(temperature.to(e.device, torch.float32).unsqueeze(1))
    return e.exp_()


def apply_top_k(e: torch.Tensor, top_k: torch.Tensor) -> None:  # e [R, V] IN PLACE, top_k [R]
    """Zero what each row's top-k drops (0 or >= V: keep all)."""
    vocab = e.shape[-1]
    top_k = top_k.to(e.device)
    rows = (top_k > 0) & (top_k < vocab)
    if not bool(rows.any()):
        return
    widest = int(top_k[rows].max())
    largest = torch.topk(e, widest, dim=-1).values  # [R, K] descending
    kth = largest.gather(1, (top_k.clamp(1, widest) - 1).unsqueeze(1)).squeeze(1)  # [R]
    e.masked_fill_(e < torch.where(rows, kth, torch.zeros_like(kth)).unsqueeze(1), 0.0)


def _buckets(e: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[R, V]`` float32 >= 0 -> ``[R, V]`` int32 flat bin of each value (``out``: reuse)."""
    rows = e.shape[0]
    bins = torch.bitwise_right_shift(e.view(torch.int32), 16, out=out) if out is not None else \
        torch.bitwise_right_shift(e.view(torch.int32), 16)
    return bins.add_((torch.arange(rows, dtype=torch.int32, device=e.device) * STRIDE).unsqueeze(1))


def _histogram(e: torch.Tensor, bins: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[R, STRIDE]`` mass per bucket (``dtype`` accumulation)."""
    weights = e.reshape(-1).to(dtype)
    return torch.bincount(bins.reshape(-1), weights=weights,
                          minlength=e.shape[0] * STRIDE).view(e.shape[0], STRIDE)


@dataclass(frozen=True)
class Cut:
    bucket: torch.Tensor  # [R] int64 bucket holding the top-p cut
    before: torch.Tensor  # [R] mass of every larger bucket
    reached: torch.Tensor  # [R] ``before`` + the cut bucket's mass
    target: torch.Tensor  # [R] top_p * total
    total: torch.Tensor  # [R] the row's whole mass


def _cut(hist: torch.Tensor, top_p: torch.Tensor) -> Cut:  # hist [R, STRIDE] ascending, top_p [R]
    """Find the cut bucket in two levels (groups of ``GROUP`` buckets, then inside the chosen
    group), so no running sum spans all buckets and only small arrays are float64."""
    rows = hist.shape[0]
    grouped = hist.view(rows, GROUPS, GROUP)  # [R, NG, G] ascending value order
    group_mass = grouped.sum(2).double()  # [R, NG]
    below = group_mass.cumsum(1) - group_mass  # [R, NG] mass of smaller groups
    total = below[:, -1] + group_mass[:, -1]
    target = top_p.double() * total
    group_from = total.unsqueeze(1) - below  # [R, NG] mass of this group and every larger one
    group = ((group_from >= target.unsqueeze(1)).sum(1) - 1).clamp(min=0)  # [R]
    above = group_from.gather(1, group.unsqueeze(1)).squeeze(1) - group_mass.gather(
        1, group.unsqueeze(1)).squeeze(1)  # [R] mass of larger groups
    inner = grouped[torch.arange(rows, device=hist.device), group].double()  # [R, G]
    inner_from = above.unsqueeze(1) + inner.flip(1).cumsum(1).flip(1)  # [R, G] this bucket and up
    first = ((inner_from >= target.unsqueeze(1)).sum(1) - 1).clamp(min=0)  # [R]
    at = first.unsqueeze(1)
    reached = inner_from.gather(1, at).squeeze(1)
    return Cut(bucket=group * GROUP + first, before=reached - inner.gather(1, at).squeeze(1),
               reached=reached, target=target, total=total)


CHUNK_ROWS = max(1, (1 << 24) // STRIDE)  # rows per histogram: bounds its memory


def exact_cut(
    e: torch.Tensor,  # [R, V] float32 (top-k applied)
    top_p: torch.Tensor,  # [R] float32; rows with 1.0 keep everything
) -> tuple[torch.Tensor, torch.Tensor]:  # threshold [R] float32, kept total [R] float64
    """Each row's top-p threshold and kept mass, exactly (float64 sums)."""
    if bool((top_p >= 1.0).all()):  # no cut (temperature/top-k only): nothing to search for
        return (torch.zeros(e.shape[0], dtype=torch.float32, device=e.device),
                e.sum(dim=-1, dtype=torch.float64))
    parts = [_exact_cut(e[i:i + CHUNK_ROWS], top_p[i:i + CHUNK_ROWS].to(e.device))
             for i in range(0, e.shape[0], CHUNK_ROWS)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([t for t, _ in parts]), torch.cat([k for _, k in parts])


def _exact_cut(
    e: torch.Tensor,  # [R, V] float32 (top-k applied)
    top_p: torch.Tensor,  # [R] float32; rows with 1.0 keep everything
) -> tuple[torch.Tensor, torch.Tensor]:  # threshold [R] float32, kept total [R] float64
    if e.shape[-1] <= SORT_VOCAB:
        return _sorted_cut(e, top_p)
    bins = _buckets(e)
    cut = _cut(_histogram(e, bins, torch.float64), top_p)
    local = cut.bucket + torch.arange(e.shape[0], device=e.device) * STRIDE  # [R] flat bin
    inside = bins == local.to(torch.int32).unsqueeze(1)  # [R, V]
    count = torch.count_nonzero(inside, dim=1)  # [R]
    width = max(int(count.max()), 1)
    values = torch.topk(torch.where(inside, e, 0.0), width, dim=-1).values.double()  # [R, W]
    mass_before = cut.before.unsqueeze(1) + values.cumsum(1) - values  # [R, W]
    within = torch.arange(width, device=e.device).unsqueeze(0) < count.unsqueeze(1)
    kept = ((mass_before < cut.target.unsqueeze(1)) & within).sum(1).clamp(min=1)  # [R]
    threshold = values.gather(1, (kept - 1).unsqueeze(1)).squeeze(1)  # [R]
    total = cut.before + (values * (values >= threshold.unsqueeze(1))).sum(1)
    keep_all = top_p.to(e.device) >= 1.0
    return (torch.where(keep_all, torch.zeros_like(threshold), threshold).float(),
            torch.where(keep_all, cut.total, total))


def _sorted_cut(e: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_exact_cut`` for small vocabularies, where a sort is cheaper than the histogram."""
    values = torch.sort(e, dim=-1, descending=True).values.double()  # [R, V]
    cumulative = values.cumsum(1)
    target = top_p.double() * cumulative[:, -1]
    kept = ((cumulative - values) < target.unsqueeze(1)).sum(1).clamp(min=1)  # [R]
    threshold = values.gather(1, (kept - 1).unsqueeze(1)).squeeze(1)
    total = (values * (values >= threshold.unsqueeze(1))).sum(1)
    keep_all = top_p >= 1.0
    return (torch.where(keep_all, torch.zeros_like(threshold), threshold).float(),
            torch.where(keep_all, cumulative[:, -1], total))


def filter_rows(e: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Dense filtered probabilities ``[R, V]`` float32 from ``scaled_exp`` output (``e`` is
    modified in place)."""
    apply_top_k(e, top_k)
    threshold, total = exact_cut(e, top_p)
    e.masked_fill_(e < threshold.unsqueeze(1), 0.0)
    return (e.double() / total.unsqueeze(1)).float()


COMPACT_SHARE = 8
"""A row compacts its candidates when they are at most ``1 / COMPACT_SHARE`` of the vocabulary;
wider rows (flat distributions, no top-p) stay dense."""


@dataclass
class Kept:
    """Rows' kept sets after top-k/top-p, in vocabulary order; ``p = e / total`` on kept tokens.

    Compact (``ids`` set): entry ``j`` of row ``r`` is token ``ids[r, j]`` with value ``e[r, j]``;
    ids ascend along a row, padding entries are token ``vocab`` with e 0. Dense (``ids`` None):
    entry ``j`` is token ``j``. Entries that are not kept hold 0.
    """

    e: torch.Tensor  # [R, K] float32
    ids: torch.Tensor | None  # [R, K] int64, or None (dense: K = V)
    threshold: torch.Tensor  # [R] float32: a token is kept iff its e >= threshold (and e > 0)
    total: torch.Tensor  # [R] float64: the kept mass
    vocab: int

    def locate(self, rows: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat entry ``[S]`` of each (row, token) pair ``[S]``, and whether the row holds it."""
        if self.ids is None:
            return rows * self.vocab + ids, torch.ones_like(rows, dtype=torch.bool)
        stride = self.vocab + 1  # flat keys row * stride + id ascend across the whole table
        keys = (torch.arange(self.ids.shape[0], device=rows.device).unsqueeze(1) * stride
                + self.ids).view(-1)
        wanted = rows * stride + ids
        at = torch.searchsorted(keys, wanted).clamp_(max=keys.numel() - 1)
        return at, keys[at] == wanted

    def token_at(self, entry: torch.Tensor) -> torch.Tensor:  # [R] entry of each row -> [R] token
        if self.ids is None:
            return entry
        return self.ids.gather(1, entry.unsqueeze(1)).squeeze(1)


class KeptGroup(NamedTuple):
    rows: torch.Tensor  # [R'] the rows of the caller's ``e`` this group holds
    kept: Kept


def kept_tokens(e: torch.Tensor, top_p: torch.Tensor) -> list[KeptGroup]:
    """The kept sets of ``e`` ``[R, V]`` (float32, top-k applied), grouped by layout."""
    vocab, device = e.shape[-1], e.device
    top_p = top_p.to(device)
    groups = []
    compact = torch.zeros(e.shape[0], dtype=torch.bool, device=device)
    cut = torch.nonzero(top_p < 1.0).squeeze(1)
    if cut.numel():
        rows = e if cut.numel() == e.shape[0] else e.index_select(0, cut)
        kept = _compacted(rows, top_p[cut])
        if kept is not None:
            groups.append(KeptGroup(cut, kept))
            compact[cut] = True
    dense = torch.nonzero(~compact).squeeze(1)
    if dense.numel():
        rows = e if dense.numel() == e.shape[0] else e.index_select(0, dense)
        threshold, total = exact_cut(rows, top_p[dense])
        rows = rows.masked_fill(rows < threshold.unsqueeze(1), 0.0)
        groups.append(KeptGroup(dense, Kept(rows, None, threshold, total, vocab)))
    return groups


def _compacted(e: torch.Tensor, top_p: torch.Tensor) -> Kept | None:
    """``Kept`` of rows that all have a top-p cut, compacted to their candidates (None: too wide)."""
    vocab = e.shape[-1]
    whole = e.sum(dim=-1, dtype=torch.float64)  # [R]
    target = top_p.double() * whole  # [R] the cut: keep while the mass before is below this
    for floor in (_histogram_floor(e, top_p), _sure_floor(whole, target, vocab)):
        found = _candidates(e, floor)
        if found is None:
            return None
        ids, values = found  # [R, W] vocabulary order, padding: id vocab, value 0
        descending = values.sort(dim=1, descending=True).values.double()  # [R, W]
        running = descending.cumsum(dim=1)  # [R, W]
        if bool((running[:, -1] >= target).all()):  # the candidates hold the cut: exact from here
            break
    else:
        return None
    kept = ((running - descending) < target.unsqueeze(1)).sum(dim=1).clamp_(min=1)  # [R]
    threshold = descending.gather(1, (kept - 1).unsqueeze(1)).squeeze(1).float()  # [R]
    values.masked_fill_(values < threshold.unsqueeze(1), 0.0)
    return Kept(values, ids, threshold, values.sum(dim=1, dtype=torch.float64), vocab)


TINY = float(torch.finfo(torch.float32).smallest_normal) * 2.0**-23  # the smallest subnormal


def _histogram_floor(e: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:  # [R] float32
    """The lower edge of the bucket below the float32 histogram's cut bucket: the candidates it
    leaves are the nucleus and a sliver, unless float32 sums misplace the cut (then checked)."""
    cut = _cut(_histogram(e, _buckets(e), torch.float32), top_p)
    edge = (cut.bucket - 1).clamp_(min=0).to(torch.int32).bitwise_left_shift_(16)
    return edge.view(torch.float32).clamp_(min=TINY)


def _sure_floor(whole: torch.Tensor, target: torch.Tensor, vocab: int) -> torch.Tensor:  # [R]
    """A floor the cut never lies below: everything under it holds < ``vocab * floor``, at most
    the mass top-p drops (``whole - target``); the margin absorbs rounding."""
    return ((whole - target) / vocab * (1 - 1e-6)).float().clamp_(min=TINY)


def _candidates(e: torch.Tensor, floor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Entries ``e >= floor`` of each row, packed left in vocabulary order: ids, values ``[R, W]``."""
    rows, vocab = e.shape
    row, column = torch.nonzero(e >= floor.unsqueeze(1), as_tuple=True)  # row-major order
    counts = torch.bincount(row, minlength=rows)  # [R]
    width = max(int(counts.max()), 1)
    if width * COMPACT_SHARE > vocab:
        return None
    slot = torch.arange(row.numel(), device=e.device) - (counts.cumsum(0) - counts)[row]
    ids = torch.full((rows, width), vocab, dtype=torch.long, device=e.device)
    ids[row, slot] = column
    values = torch.zeros((rows, width), dtype=torch.float32, device=e.device)
    values[row, slot] = e[row, column]
    return ids, values
