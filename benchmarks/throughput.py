"""Throughput side by side, in one run, on one machine, with one model pair.

Measures:
  * target-only autoregressive decoding (the cloud-only baseline: ``generate_target_only``);
  * Hugging Face assisted generation (``generate(assistant_model=draft, do_sample=False)``);
  * specd with 1 and 8 sessions drafting with the real draft model (torch backend);
  * specd with 1, 32 and 128 sessions drafting with the replay drafter, its acceptance calibrated
    to the real pair's measured tokens per round (so only the verifier side scales);
  * a one-session-at-a-time verifier (``max_batch_sessions=1``: no batching across sessions, how
    earlier edge-cloud systems serve clients) at 32 replay sessions;
  * the broker overhead per round (edge round trip minus verifier queueing and compute) and the
    raw XADD + blocking XREAD ping-pong through Redis.

Every process uses one torch thread. Results: ``benchmarks/results/throughput.{json,md}``.

Full run (on a quiet machine; takes ~15 minutes on 2 cores):

    PYTHONPATH=. python benchmarks/throughput.py --target-model bundled:target \\
        --draft-model bundled:draft --prompts 16 --max-new-tokens 64 --sessions-per-slot 2
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common.logs import configure_logging
from common.models import load_causal_lm
from common.sampling import SamplingParams
from common.settings import Settings, load_settings
from specd.loadtest import LoadTestOptions, run_loadtest
from specd.prompts import read_prompts
from specd.replay import make_replay
from verifier_worker.engine import TargetEngine, generate_target_only

RESULTS = Path(__file__).resolve().parent / "results"
# ../shared beside the checkout (see the project README); any JSONL with a text field works.
DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval.json"


def target_only(target: Any, prompts: list[list[int]], max_new: int) -> dict[str, Any]:
    engine = TargetEngine(target.model, target.vocab_size)
    started, tokens = time.perf_counter(), 0
    for ids in prompts:
        tokens += len(generate_target_only(engine, ids, SamplingParams(), target.eos_token_ids, max_new))
    wall = time.perf_counter() - started
    return {"name": "target-only (cloud-only baseline)", "sessions": 1, "tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2)}


@torch.inference_mode()
def hf_assisted(target: Any, draft: Any, prompts: list[list[int]], max_new: int,
                gamma: int) -> dict[str, Any]:
    draft.model.generation_config.num_assistant_tokens = gamma
    draft.model.generation_config.num_assistant_tokens_schedule = "constant"
    started, tokens = time.perf_counter(), 0
    for ids in prompts:
        inputs = torch.tensor([ids])
        out = target.model.generate(inputs, attention_mask=torch.ones_like(inputs),
                                    assistant_model=draft.model,
                                    do_sample=False, max_new_tokens=max_new,
                                    pad_token_id=target.tokenizer.pad_token_id or 0)
        tokens += int(out.shape[1] - inputs.shape[1])
    wall = time.perf_counter() - started
    return {"name": f"HF assisted generation (gamma={gamma})", "sessions": 1, "tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2)}


def replay_alpha(tokens_per_round: float, gamma: int) -> float:
    """Per-token acceptance alpha giving ``(1 - a^(g+1)) / (1 - a)`` tokens per round (bisection)."""
    low, high = 0.0, 0.9999
    for _ in range(60):
        mid = (low + high) / 2
        if (1 - mid ** (gamma + 1)) / (1 - mid) < tokens_per_round:
            low = mid
        else:
            high = mid
    return round(low, 4)


def specd_point(settings: Settings, name: str, sessions: int, prompts: list[str], runs: int,
                log_dir: Path, edges: int) -> dict[str, Any]:
    options = LoadTestOptions(edges=edges, sessions_per_edge=max(1, sessions // edges), prompts=runs,
                              prompt_texts=prompts, verifiers=1, sweep_sessions=[sessions],
                              log_dir=log_dir / name.replace(" ", "_"), progress=False)
    report = asyncio.run(run_loadtest(settings, options, out=io.StringIO()))
    point = report["points"][0]
    return {"name": name, "sessions": sessions, "tokens": point["tokens"], "wall_s": point["wall_s"],
            "tokens_per_s": point["tokens_per_s"], "errors": point["error_count"],
            "acceptance_rate": point["acceptance_rate"], "tokens_per_round": point["mean_accepted_length"],
            "mean_batch_size": (point["verifier"] or {}).get("mean_batch_size"),
            "round_p50_ms": point["round_latency_ms"]["p50"],
            "broker_overhead_p50_ms": point["broker_overhead_ms"]["p50"]}


async def raw_round_trip(url: str, rounds: int) -> dict[str, Any]:
    """XADD to a request stream, a responder XREADs it and XADDs a reply the caller XREADs."""
    from broker.streams import connect

    caller, responder = connect(url), connect(url)
    key = f"bench-rtt-{time.time_ns()}"

    async def respond() -> None:
        last = "0-0"
        for _ in range(rounds):
            reply = await responder.xread({f"{key}:req": last}, block=5000, count=1)
            last = reply[0][1][0][0]
            await responder.xadd(f"{key}:rep", {b"m": b"x"})

    task, times, last = asyncio.create_task(respond()), [], "0-0"
    for _ in range(rounds):
        start = time.perf_counter()
        await caller.xadd(f"{key}:req", {b"m": b"x" * 64})
        reply = await caller.xread({f"{key}:rep": last}, block=5000, count=1)
        last = reply[0][1][0][0]
        times.append((time.perf_counter() - start) * 1000)
    await task
    await caller.delete(f"{key}:req", f"{key}:rep")
    await caller.aclose()
    await responder.aclose()
    return {"rounds": rounds, "median_ms": round(statistics.median(times), 4),
            "p95_ms": round(sorted(times)[int(0.95 * len(times)) - 1], 4)}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    base = {"models": {"target": args.target_model, "draft": args.draft_model, "torch_threads": 1},
            "redis": {"url": args.redis_url or None},
            "sampling": {"temperature": 0.0, "max_new_tokens": args.max_new_tokens},
            "edge": {"gamma": args.gamma, "multiplex_verdicts": True, "verdict_timeout_s": 300.0}}
    settings = load_settings(base)
    texts = [t[: args.max_prompt_chars or None] for t in read_prompts(args.prompts_file)[: args.prompts]]
    target = load_causal_lm(args.target_model)
    draft = load_causal_lm(args.draft_model)
    ids = [target.tokenizer.encode(t) for t in texts]
    rows = [target_only(target, ids, args.max_new_tokens),
            hf_assisted(target, draft, ids, args.max_new_tokens, args.gamma)]
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="specd-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    per_slot = args.sessions_per_slot
    rows.append(specd_point(settings, "specd 1 session (torch draft)", 1, texts, len(texts), log_dir, 1))
    rows.append(specd_point(settings, "specd 8 sessions (torch draft)", 8, texts, 8 * per_slot, log_dir, 2))
    alpha = replay_alpha(rows[2]["tokens_per_round"], args.gamma)
    replay_path = log_dir / "replay.json"
    make_replay(settings, texts, replay_path)
    replay = load_settings({**base, "edge": {**base["edge"], "backend": "replay",
                                             "replay_file": str(replay_path), "replay_acceptance": alpha}})
    for sessions in (1, 32, 128):
        runs = len(texts) if sessions == 1 else sessions * per_slot
        rows.append(specd_point(replay, f"specd {sessions} sessions (replay)", sessions, texts, runs,
                                log_dir, 1 if sessions == 1 else 2))
    one_at_a_time = load_settings({**base, "edge": replay.edge.model_dump(),
                                   "verifier": {"max_batch_sessions": 1}})
    rows.append(specd_point(one_at_a_time, "one-session-at-a-time verifier, 32 sessions (replay)", 32, texts,
                            32 * per_slot, log_dir, 2))
    from specd.generation import redis_url_for

    async def rtt() -> dict[str, Any]:
        async with redis_url_for(settings) as (url, _):
            return await raw_round_trip(url, args.rtt_rounds)

    by_name = {r["name"]: r["tokens_per_s"] for r in rows}
    single = rows[2]["tokens_per_s"]
    return {
        "command": ["python", *sys.argv], "machine": {"platform": platform.platform(), "python":
                                                      platform.python_version(), "torch": torch.__version__},
        "target": args.target_model, "draft": args.draft_model, "gamma": args.gamma,
        "max_new_tokens": args.max_new_tokens, "prompts": len(texts), "replay_acceptance_alpha": alpha,
        "rows": rows,
        "ratios": {
            "specd_1_vs_target_only": ratio(single, rows[0]["tokens_per_s"]),
            "specd_1_vs_hf_assisted": ratio(single, rows[1]["tokens_per_s"]),
            "replay_32_vs_replay_1": ratio(by_name["specd 32 sessions (replay)"],
                                           by_name["specd 1 sessions (replay)"]),
            "replay_32_vs_one_at_a_time_32": ratio(by_name["specd 32 sessions (replay)"],
                                                   rows[-1]["tokens_per_s"]),
        },
        "broker_overhead_per_round_median_ms": rows[2]["broker_overhead_p50_ms"],
        "raw_xadd_xread_round_trip": asyncio.run(rtt()),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Target `{result['target']}`, draft `{result['draft']}`, gamma {result['gamma']}, "
             f"{result['max_new_tokens']} new tokens, {result['prompts']} prompts, greedy, 1 torch thread "
             f"per process; replay acceptance alpha {result['replay_acceptance_alpha']} (calibrated).", "",
             "| configuration | sessions | tokens | wall s | tokens/s | accept | tok/round | batch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['sessions']} | {r['tokens']} | {r['wall_s']} | "
                     f"{r['tokens_per_s']} | "
                     f"{r.get('acceptance_rate', '')} | {r.get('tokens_per_round', '')} | "
                     f"{r.get('mean_batch_size') or ''} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in result["ratios"].items()]
    raw = result["raw_xadd_xread_round_trip"]
    lines += ["", f"Broker overhead per round (median, specd 1 session): "
                  f"{result['broker_overhead_per_round_median_ms']} ms; raw XADD+XREAD round trip median "
                  f"{raw['median_ms']} ms (p95 {raw['p95_ms']} ms).", "",
              f"Command: `{' '.join(result['command'])}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-model", default="bundled:target")
    parser.add_argument("--draft-model", default="bundled:draft")
    parser.add_argument("--prompts-file", type=Path, default=DEFAULT_PROMPTS)
    parser.add_argument("--prompts", type=int, default=16, help="prompts for the single-session runs")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-chars", type=int, default=0, help="cut prompts (0: keep whole)")
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--sessions-per-slot", type=int, default=2, help="sessions each slot runs (multi)")
    parser.add_argument("--redis-url", default="", help="default: an embedded Redis per configuration")
    parser.add_argument("--rtt-rounds", type=int, default=2000)
    parser.add_argument("--log-dir", type=Path)
    parser.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    args = parser.parse_args(argv)
    configure_logging("warning", "console")
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
