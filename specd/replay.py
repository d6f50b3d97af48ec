"""Making replay files: the target's greedy continuation of every prompt, computed once.

The replay draft backend (edge_worker.backends.replay) proposes these continuations so load
tests need no draft model. Prompts are decoded in batches through the verifier's own engine
(one forward pass per step for a whole batch, zero drafted tokens), i.e. exactly the target's
greedy output that a speculative session must reproduce.
"""

from __future__ import annotations

from pathlib import Path

from common.models import load_causal_lm, set_torch_threads
from common.sampling import SamplingParams, apply_stop_rules
from common.settings import Settings
from edge_worker.backends.replay import ReplayFile
from verifier_worker.engine import Draft, TargetEngine, VerifyRequest
from verifier_worker.kv import SessionKV

BATCH = 32


def greedy_continuations(engine: TargetEngine, prompts: list[list[int]], stops: frozenset[int],
                         max_new_tokens: int) -> list[list[int]]:
    """Target greedy output for each prompt, ``BATCH`` prompts per forward pass."""
    outputs: list[list[int]] = [[] for _ in prompts]
    greedy = SamplingParams()
    for start in range(0, len(prompts), BATCH):
        active = {i: (SessionKV(), list(prompts[i])) for i in range(start, min(start + BATCH, len(prompts)))}
        seq = 0
        while active:
            order = list(active)
            outcomes = engine.verify([VerifyRequest(active[i][0], active[i][1], Draft.empty(), greedy, seq)
                                      for i in order])
            for i, outcome in zip(order, outcomes, strict=True):
                kept, finish = apply_stop_rules([outcome.token], len(outputs[i]), stops, max_new_tokens)
                outputs[i].extend(kept)
                active[i][1].extend(kept)
                if finish:
                    active.pop(i)[0].clear()
            seq += 1
    return outputs


def make_replay(settings: Settings, prompts: list[str], path: Path) -> ReplayFile:
    """Run the target greedily on ``prompts`` and write the replay file to ``path``."""
    models = settings.models
    set_torch_threads(models.torch_threads)
    target = load_causal_lm(models.target, models.dtype, models.target_device, models.trust_remote_code,
                            cache_dir=settings.edge.cache_dir)
    engine = TargetEngine(target.model, target.vocab_size)
    unique = list(dict.fromkeys(tuple(target.tokenizer.encode(p)) for p in prompts))
    max_new = settings.sampling.max_new_tokens
    continuations = greedy_continuations(engine, [list(p) for p in unique], target.eos_token_ids, max_new)
    replay = ReplayFile(target=models.target, fingerprint=target.fingerprint,
                        entries=dict(zip(unique, continuations, strict=True)),
                        vocab_size=target.vocab_size, eos_token_ids=target.eos_token_ids,
                        max_new_tokens=max_new)
    path.parent.mkdir(parents=True, exist_ok=True)
    replay.save(path)
    return replay
