"""Sessions one verifier holds on a fixed KV budget: admission by reserve vs by blocks used.

Sessions ask for ``max_new_tokens`` 1,024 but stop after 50-300 tokens (uniform), as chat
sessions do. Opens queue without end (a saturated verifier); each round every resident session
feeds its last token plus a gamma-4 draft and keeps 1-5 tokens. Two admission rules on the same
budget, same session stream, both decided by the worker's own rule
(``verifier_worker.capacity.decide_admission``: admit on Take or Evict, stop on anything else)
over two accountings of what a session reserves:

  * reserve (the former extent arena): ``prompt + max_new_tokens + draft room`` per resident
    session, against the whole budget;
  * blocks (the paged arena, what the worker counts: ``VerifierSession.reserve``): the blocks a
    session holds, or its first pass while it holds none, against the budget less the growth
    headroom (``KVArena.admission_budget``); a pass that finds no free block drops the least
    recently used cache outside it (``capacity.lru_victims``; recomputed later: counted as
    ``preemptions``). Passes take ``max_batch_sessions`` resident sessions round-robin, as the
    worker's scheduler does under load.

Both run the real ``KVArena`` block accounting (a 1-element-per-token shape, so no memory is
spent on keys). Reported: mean (after the first quarter) and peak resident sessions, and
preemptions. ``sessions_finished`` is bounded by the passes (64 sessions each, the same in both
runs), not by memory: it is no throughput figure.

    PYTHONPATH=. python benchmarks/kv_admission.py
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from verifier_worker.capacity import AdmissionRules, Evict, OpenRequest, Take, decide_admission
from verifier_worker.kv import ArenaShape, KVArena, SessionKV

RESULTS = Path(__file__).resolve().parent / "results"
DRAFT_ROOM = 16  # limits.max_gamma: one round's largest draft


@dataclass
class Sim:
    prompt: int
    stop_after: int
    max_new: int
    by_blocks: bool  # the paged accounting, or the extent arena's reserve for max_new_tokens
    kv: SessionKV = field(default_factory=SessionKV)
    generated: int = 0
    evicted: bool = False  # what decide_admission reads besides ``reserve`` (never idle here)
    queue: tuple[int, ...] = ()
    last_active: float = 0.0

    @property
    def context(self) -> int:
        return self.prompt + self.generated

    @property
    def reserve(self) -> int:
        if self.by_blocks:
            return self.kv.size or self.context + DRAFT_ROOM
        return self.prompt + self.max_new + DRAFT_ROOM


def admits(resident: list[Sim], waiting: Sim, rules: AdmissionRules) -> bool:
    decision = decide_admission(resident, OpenRequest("t", waiting.reserve), rules, {}, now=0.0)
    return isinstance(decision, Take | Evict)


def simulate(rule: str, budget: int, rounds: int, seed: int, max_new: int, gamma: int,
             batch: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    arena = KVArena(ArenaShape(1, 1, 1), budget, torch.float32, torch.device("cpu"))
    by_blocks = rule == "blocks"
    rules = AdmissionRules(budget=arena.admission_budget if by_blocks else budget, idle_evict_s=float("inf"))
    turn = 0
    resident: list[Sim] = []
    waiting = None
    counts, finished = [], 0
    for _ in range(rounds):
        while True:  # admit from the endless queue while the rule allows
            waiting = waiting or Sim(int(rng.integers(32, 257)), int(rng.integers(50, 301)), max_new,
                                     by_blocks)
            if not admits(resident, waiting, rules):
                break
            resident.append(waiting)
            waiting = None
        turn %= max(len(resident), 1)
        members = (resident[turn:] + resident[:turn])[:batch]  # round-robin, max_batch_sessions
        turn += batch
        arena.allocate_pass([(s.kv, s.context + gamma) for s in members])  # may drop idle caches
        counts.append(len(resident))
        for s in members:
            s.kv.length = s.context + gamma
            s.generated += int(rng.integers(1, gamma + 2))
            s.kv.truncate(s.context - 1)
        done = [s for s in resident if s.generated >= min(s.stop_after, s.max_new)]
        for s in done:
            s.kv.clear()
            finished += 1
        resident = [s for s in resident if s not in done]
    settled = counts[len(counts) // 4:]  # skip the ramp-up
    return {"mean_resident_sessions": round(float(np.mean(settled)), 1),
            "peak_resident_sessions": max(counts), "sessions_finished": finished,
            "preemptions": arena.preemptions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-tokens", type=int, default=262144, help="pool.kv_budget_tokens")
    parser.add_argument("--batch", type=int, default=64, help="pool.max_batch_sessions")
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--out", default=str(RESULTS / "kv_admission.json"))
    args = parser.parse_args(argv)
    report: dict[str, object] = {
        "budget_tokens": args.budget_tokens, "rounds": args.rounds, "max_new_tokens": args.max_new_tokens,
        "stop_after": "uniform 50-300 tokens", "max_batch_sessions": args.batch,
        "prompt_tokens": "uniform 32-256", "gamma": args.gamma,
        "block_tokens": KVArena(ArenaShape(1, 1, 1), 16, torch.float32, torch.device("cpu")).block_tokens,
    }
    for rule in ("reserve", "blocks"):
        report[rule] = simulate(rule, args.budget_tokens, args.rounds, 0, args.max_new_tokens, args.gamma,
                                args.batch)
        print(rule, json.dumps(report[rule]), flush=True)
    held = report["blocks"]["mean_resident_sessions"] / report["reserve"]["mean_resident_sessions"]  # type: ignore[index]
    report["sessions_ratio"] = round(held, 2)
    print("ratio", report["sessions_ratio"])
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
