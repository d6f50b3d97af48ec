"""Held-out acceptance of a draft for a target: the metric ``specd train-draft`` optimises for.

For each held-out prompt the target continues greedily for ``new_tokens`` tokens (its own path,
what a speculative session commits); one teacher-forced forward of each model over prompt +
continuation then gives, per position, whether the draft's argmax is the target's token and the
sampled acceptance probability sum(min(p, q)) at temperature 1. Greedy speculation accepts the
drafts of a round while they match, so the per-position matches give the rounds of a session at
any gamma exactly (a round commits its matching run, at most gamma, plus one target token).

Also used to build training data from the target's own continuations (``continue_greedily``):
a draft sees the target's text at run time, not the corpus's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PromptScore:
    matches: list[bool]  # per continuation position: draft argmax == target token
    sampled_alpha: list[float]  # per position: sum over the vocabulary of min(p, q)


@torch.inference_mode()
def continue_greedily(model: Any, prompts: list[list[int]], new_tokens: int,
                      stop: frozenset[int] = frozenset(), batch: int = 32) -> list[list[int]]:
    """Each prompt's greedy continuation (cut after a stop token); equal-length prompts batched."""
    from transformers import DynamicCache

    out: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(index)
    for indices in by_length.values():
        for start in range(0, len(indices), batch):
            group = indices[start:start + batch]
            cache, ids = DynamicCache(), torch.tensor([prompts[i] for i in group])
            for _ in range(new_tokens):
                result = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache, ids = result.past_key_values, result.logits[:, -1].argmax(-1, keepdim=True)
                for row, i in enumerate(group):
                    out[i].append(int(ids[row, 0]))
    return [_cut_at_stop(path, stop) for path in out]


def _cut_at_stop(path: list[int], stop: frozenset[int]) -> list[int]:
    for index, token in enumerate(path):
        if token in stop:
            return path[:index + 1]
    return path


@torch.inference_mode()
def path_probs(model: Any, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """[len(continuation), V] next-token probabilities along ``prompt + continuation``."""
    ids = torch.tensor([prompt + continuation])
    start = len(prompt) - 1  # the logits at position i predict token i + 1
    logits = model(input_ids=ids).logits[0, start:start + len(continuation)].float()
    return torch.softmax(logits, dim=-1)


def score_prompt(target_p: torch.Tensor, draft: Any, prompt: list[int],
                 continuation: list[int]) -> PromptScore:
    """Per-position greedy match and sampled acceptance of ``draft`` along the target's path."""
    q = path_probs(draft, prompt, continuation)
    vocab = min(target_p.shape[-1], q.shape[-1])
    alpha = torch.minimum(target_p[:, :vocab], q[:, :vocab]).sum(-1)
    wanted = torch.tensor(continuation)
    return PromptScore((q.argmax(-1) == wanted).tolist(), alpha.tolist())


def rounds_for(matches: list[bool], gamma: int) -> int:
    """Rounds a greedy session needs to commit ``len(matches)`` tokens with ``gamma`` drafts."""
    rounds, position = 0, 0
    while position < len(matches):
        run = 0
        while run < gamma and position + run < len(matches) and matches[position + run]:
            run += 1
        position += run + 1
        rounds += 1
    return rounds


def summarise(scores: list[PromptScore], gammas: tuple[int, ...] = (2, 4, 8)) -> dict[str, Any]:
    """Acceptance figures over held-out prompts: greedy match rate, sampled alpha, tokens/round."""
    positions = sum(len(s.matches) for s in scores)
    if not positions:
        return {"prompts": len(scores), "positions": 0}
    tokens_per_round = {}
    for gamma in gammas:
        rounds = sum(rounds_for(s.matches, gamma) for s in scores)
        tokens_per_round[f"gamma_{gamma}"] = round(positions / rounds, 4)
    return {
        "prompts": len(scores), "positions": positions,
        "greedy_acceptance": round(sum(sum(s.matches) for s in scores) / positions, 4),
        "sampled_acceptance": round(sum(sum(s.sampled_alpha) for s in scores) / positions, 4),
        "tokens_per_round": tokens_per_round,
    }


def evaluate(draft: Any, prompts: list[list[int]], paths: list[list[int]],
             target_p: list[torch.Tensor]) -> dict[str, Any]:
    """``summarise`` over held-out ``prompts``, the target's ``paths`` and its probabilities on them."""
    was_training = draft.training
    draft.eval()
    scores = [score_prompt(p, draft, prompt, path)
              for prompt, path, p in zip(prompts, paths, target_p, strict=True) if path]
    if was_training:
        draft.train()
    return summarise(scores)
