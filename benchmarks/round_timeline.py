"""Where one session's round goes: the draft, the target's pass, and everything between them.

``specd generate``'s speculative path (embedded Redis, the verifier in this process, the torch
draft), greedy, one session at a time on the first ``--prompts`` HumanEval prompts. Each step is
timed where it runs: the edge's drafting (``_EdgeSession._draft``), the verifier's forward pass
(``TargetEngine.verify``) and its commit script (``RoundWriter.commit``). The rest of a round,
its wall time less the draft and the pass, is the protocol: the draft's XADD, the verifier's read,
decoding and checks, the commit, the verdict's read on the edge and its checks.

    PYTHONPATH=. python benchmarks/round_timeline.py                    # bundled pair
    PYTHONPATH=. python benchmarks/round_timeline.py --target smollm2-135m-instruct \\
        --draft smollm2-135m-draft --chat --confidence 0.6 --tag real

Writes benchmarks/results/round_timeline_<tag>.json (medians per round, in ms).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import side_by_side as sbs  # the same stack and prompts as the side-by-side run

RESULTS = Path(__file__).resolve().parent / "results"
SPANS: dict[str, list[float]] = defaultdict(list)


def timed_method(owner: Any, name: str, label: str) -> None:
    """Record the wall time of every call of ``owner.name`` (sync or async) under ``label``."""
    method = getattr(owner, name)
    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await method(*args, **kwargs)
            finally:
                SPANS[label].append((time.perf_counter() - started) * 1000)
    else:
        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                SPANS[label].append((time.perf_counter() - started) * 1000)
    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="bundled:target")
    parser.add_argument("--draft", default="bundled:draft")
    parser.add_argument("--chat", action="store_true")
    parser.add_argument("--confidence", type=float, default=0.0)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tag", default="tiny")
    args = parser.parse_args()
    from broker.rounds import RoundWriter
    from common.logs import configure_logging
    from common.models import load_tokenizer
    from edge_worker.client import _EdgeSession
    from verifier_worker.engine import TargetEngine

    configure_logging("warning")
    torch.set_num_threads(1)
    timed_method(_EdgeSession, "_draft", "draft")
    timed_method(TargetEngine, "verify", "target_pass")
    timed_method(RoundWriter, "commit", "commit")
    timed_method(_EdgeSession, "_run_round", "round")
    tokenizer = load_tokenizer(args.target)
    texts = sbs.load_prompts(sbs.PROMPTS, args.prompts)
    prompts = [sbs.encode_prompt(tokenizer, t, args.chat) for t in texts]
    stack = sbs.SpecdStack(args, ahead=False)
    try:
        sbs.timed(stack, prompts)  # warm-up
        SPANS.clear()
        rates = [round(sbs.timed(stack, prompts)[0], 2) for _ in range(args.reps)]
    finally:
        stack.close()
    rounds = len(SPANS["round"])
    # Every round drafts, passes and commits once (a session's first round also prefills).
    assert len(SPANS["draft"]) == len(SPANS["target_pass"]) == len(SPANS["commit"]) == rounds
    protocol = [r - d - p for r, d, p in
                zip(SPANS["round"], SPANS["draft"], SPANS["target_pass"], strict=True)]
    median = {name: round(statistics.median(values), 3) for name, values in SPANS.items()}
    median["protocol (round - draft - target_pass)"] = round(statistics.median(protocol), 3)
    total = {name: round(sum(values), 1) for name, values in SPANS.items()}
    share = round(sum(protocol) / sum(SPANS["round"]), 3)
    report = {"config": vars(args), "rounds": rounds, "tok_s": rates, "median_ms": median, "total_ms": total,
              "protocol_share_of_round_time": share}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"round_timeline_{args.tag}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
