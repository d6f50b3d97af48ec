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
one bucket that holds it (small vocabularies just sort). ``cut_bounds`` gives the cheap float32
version of the same histogram: bounds on ``total`` that decide almost every acceptance test
without the exact step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BUCKETS = (0x3F800000 >> 16) + 1  # bits >> 16 of floats in [0, 1]
GROUP = 128  # buckets per group in the two-level search (one octave)
GROUPS = -(-BUCKETS // GROUP)
STRIDE = GROUPS * GROUP  # histogram bins per row (the last few stay empty)
SLACK = 4e-6  # relative error allowed for the float32 histogram's bucket sums (~64 float32 ulps)
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


def cut_bounds(e: torch.Tensor, top_p: torch.Tensor,  # e [R, V] float32, top_p [R]
               scratch: torch.Tensor | None = None) -> Cut:  # scratch: [>= R * V] int32
    """The top-p cut bucket from a float32 histogram: ``target <= kept total <= reached``."""
    top_p = top_p.to(e.device)
    parts = []
    for i in range(0, e.shape[0], CHUNK_ROWS):
        rows = e[i:i + CHUNK_ROWS]
        out = scratch[: rows.numel()].view(rows.shape) if scratch is not None else None
        parts.append(_cut(_histogram(rows, _buckets(rows, out), torch.float32), top_p[i:i + CHUNK_ROWS]))
    if len(parts) == 1:
        return parts[0]
    return Cut(*(torch.cat([getattr(c, f) for c in parts]) for f in Cut.__dataclass_fields__))


def exact_cut(
    e: torch.Tensor,  # [R, V] float32 (top-k applied)
    top_p: torch.Tensor,  # [R] float32; rows with 1.0 keep everything
) -> tuple[torch.Tensor, torch.Tensor]:  # threshold [R] float32, kept total [R] float64
    """Each row's top-p threshold and kept mass, exactly (float64 sums)."""
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
