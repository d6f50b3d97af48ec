"""What tracing costs per round: off (the default), on (spans to a JSON-lines file), side by side.

One process: an embedded Redis, an in-process verifier and an edge with the bundled tiny pair,
one torch thread. Each repetition runs the same greedy sessions with tracing off, then on, then
on, then off (ABBA, so drift on a shared machine cancels), and reports the edge's mean round time
per mode. Beside it, the hooks a round runs when tracing is off, timed alone (ns per round).

    PYTHONPATH=. python benchmarks/tracing_cost.py --out benchmarks/results/tracing_cost.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from broker.embedded import EmbeddedRedis
from common import tracing
from common.logs import configure_logging
from common.settings import Settings
from common.wire import SamplingSpec
from specd.runtime import build_edge, build_verifier, make_broker

PROMPTS = ["def fibonacci(n):", "class Stack:", "import os\n", "for i in range(10):"]


def off_hooks_ns(rounds: int = 200_000) -> float:
    """ns per round of the hooks the edge and verifier run with tracing off."""
    started = time.perf_counter_ns()
    for seq in range(rounds):
        span = tracing.start_span("specd.edge.round", None, seq=seq)
        tracing.end_span(span, accepted=1)
        tracing.log_ids("")
        tracing.enabled()
    return (time.perf_counter_ns() - started) / rounds


async def run_sessions(edge: Any, sessions: int, max_new_tokens: int) -> list[float]:
    ids = edge.backend.tokenizer.encode
    round_ms: list[float] = []
    for i in range(sessions):
        prompt = ids(PROMPTS[i % len(PROMPTS)])
        result = await edge.generate(prompt, SamplingSpec(max_new_tokens=max_new_tokens))
        round_ms.extend(result.round_ms)
    return round_ms


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    modes: dict[str, list[float]] = {"off": [], "on": []}
    with EmbeddedRedis() as redis, tempfile.TemporaryDirectory() as tmp:
        settings = Settings(redis={"url": redis.url, "key_prefix": "trc"},
                            models={"torch_threads": 1}, verifier={"idle_block_ms": 5})
        verifier_broker, edge_broker = make_broker(settings), make_broker(settings)
        verifier = build_verifier(settings, verifier_broker, worker_id="v-bench")
        edge = build_edge(settings, edge_broker)
        stop = asyncio.Event()
        task = asyncio.create_task(verifier.run(stop))
        await run_sessions(edge, 2, args.max_new_tokens)  # warm-up
        for _rep in range(args.repeats):
            for mode in ("off", "on", "on", "off"):
                if mode == "on":
                    tracing.configure("bench", file=str(Path(tmp) / "spans.jsonl"))
                modes[mode].extend(await run_sessions(edge, args.sessions, args.max_new_tokens))
                tracing.shutdown()
        stop.set()
        await task
        await verifier_broker.close()
        await edge_broker.close()
    off, on = statistics.mean(modes["off"]), statistics.mean(modes["on"])
    return {
        "benchmark": "tracing_cost", "pair": "bundled tiny pair", "torch_threads": 1,
        "sessions_per_phase": args.sessions, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "order": "ABBA per repeat (off, on, on, off)",
        "rounds": {m: len(v) for m, v in modes.items()},
        "round_ms_mean": {"off": round(off, 4), "on": round(on, 4)},
        "round_ms_median": {m: round(statistics.median(v), 4) for m, v in modes.items()},
        "on_over_off": round(on / off, 4),
        "off_hooks_ns_per_round": round(off_hooks_ns(), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    configure_logging("warning")
    report = asyncio.run(measure(args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
