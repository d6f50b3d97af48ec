"""Plain one-session-at-a-time reference of the verifier's maths (the tests' yardstick).

Written for clarity, not speed: a full sort for top-p, Python loops over positions. The batched
``common.sampling.verify_round`` must give the same outcome for the same logits and uniforms.
"""

from __future__ import annotations

import numpy as np
import torch

from common.sampling import FINAL_DRAW, GREEDY_EPSILON, SamplingParams, _splitmix64


def filtered(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:  # [V] -> [V] float64
    """The filtered target distribution p."""
    e, total = kept_mass(logits, params)
    return e.double() / total


def kept_mass(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, float]:
    """(e, total): exp((l - max) / T) zeroed outside the kept set, and its float64 sum. top-k keeps
    e >= the k-th largest; top-p keeps the sorted prefix whose mass before each token is below
    top_p of the total, plus ties of the last kept one."""
    e = torch.exp((logits.float() - logits.float().max()) / max(params.temperature, GREEDY_EPSILON))
    vocab = e.numel()
    if 0 < params.top_k < vocab:
        kth = torch.sort(e, descending=True).values[params.top_k - 1]
        e = torch.where(e < kth, torch.zeros_like(e), e)
    if params.top_p < 1.0:
        values = torch.sort(e, descending=True).values.double()
        before = values.cumsum(0) - values
        kept = int((before < float(np.float32(params.top_p)) * values.sum()).sum())
        threshold = values[max(kept, 1) - 1].float()
        e = torch.where(e < threshold, torch.zeros_like(e), e)
    return e, float(e.double().sum())


def uniforms(seed: int, seq: int, gamma: int) -> list[float]:
    """The round's draws by definition: splitmix64 of (seed, seq) keyed counters."""
    mask = (1 << 64) - 1
    key = _splitmix64(np.array([seed & mask], dtype=np.uint64))
    key = _splitmix64(key ^ np.array([seq & mask], dtype=np.uint64))
    out = []
    for counter in [*range(gamma), FINAL_DRAW]:
        with np.errstate(over="ignore"):
            bits = _splitmix64(key + np.uint64(counter) * np.uint64(0x9E3779B97F4A7C15))
        out.append(float(int(bits[0]) >> 11) * 2.0**-53)
    return out


def verify_one(logits: torch.Tensor, draft: list[int], params: SamplingParams,
               supports: list[tuple[list[int], list[float]]], u: list[float]) -> tuple[int, int]:
    """(accepted, token) for one session: ``logits`` [gamma + 1, V]; ``supports[j]`` is q_j."""
    if params.greedy:
        for j, token in enumerate(draft):
            if int(logits[j].argmax()) != token:
                return j, int(logits[j].argmax())
        return len(draft), int(logits[len(draft)].argmax())
    accepted = 0
    for j, token in enumerate(draft):
        ids, probs = supports[j]
        q = np.asarray(probs, np.float64) / np.sum(np.asarray(probs, np.float64))
        q_token = float(np.float32(q[ids.index(token)]))
        if not u[j] * q_token < float(filtered(logits[j], params)[token]):
            break
        accepted += 1
    e, total = kept_mass(logits[accepted], params)  # p = e / total
    if accepted < len(draft):
        ids, probs = supports[accepted]
        q64 = np.asarray(probs, np.float64)
        q = (q64 / q64.sum()).astype(np.float32).astype(np.float64)
        residual = e.clone()
        for token, mass in zip(ids, q, strict=True):
            residual[token] -= np.float32(mass * total)
        residual = residual.clamp(min=0.0)
        if residual.double().sum() > 0:
            e = residual
    cdf = e.double().cumsum(0)
    target = min(u[-1] * float(cdf[-1]), float(np.nextafter(float(cdf[-1]), 0.0)))
    return accepted, min(int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64),
                                                right=True)), e.numel() - 1)
