"""Soak test: many concurrent replay-drafter sessions against the pool, no lost or duplicated tokens.

Runs ``specd loadtest`` machinery with the replay backend (greedy), then checks every finished
session: its output equals the target's greedy continuation (the replay reference, cut at
max_new_tokens / the stop token), and the tokens streamed round by round concatenate to exactly
that output (nothing lost, nothing delivered twice). Exit 0 only when every session passes and no
session errored.

Full run (1,000 sessions for a minute, 4 edge processes x 250 sessions, 2 verifiers):

    PYTHONPATH=. python benchmarks/soak.py --sessions 1000 --edges 4 --duration 60 --verifiers 2 \\
        --target-model bundled:target --draft-model bundled:draft --out benchmarks/results/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from common.logs import configure_logging
from common.sampling import apply_stop_rules
from common.settings import load_settings
from edge_worker.backends.replay import ReplayFile
from specd.loadreport import PointData, summarise_point
from specd.loadtest import LoadTestOptions, VerifierPool, child_env, run_point
from specd.prompts import read_prompts
from specd.replay import make_replay

# ../shared beside the checkout (see the project README); any JSONL with a text field works.
DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "specbench_questions.jsonl"


def check_sessions(point: PointData, replay: ReplayFile, max_new_tokens: int) -> dict[str, Any]:
    """Compare every session's output and its streamed tokens with the reference."""
    wrong, stream_mismatch, unknown = [], [], []
    for result in point.results:
        reference = replay.entries.get(tuple(result["prompt_ids"]))
        if reference is None:
            unknown.append(result["session_id"])
            continue
        expected, _ = apply_stop_rules(reference, 0, replay.eos_token_ids, max_new_tokens)
        if result["token_ids"] != expected:
            wrong.append(result["session_id"])
        streamed = [t for _, ids in point.tokens.get(result["session_id"], []) for t in ids]
        if streamed != result["token_ids"]:
            stream_mismatch.append(result["session_id"])
    tokens = sum(len(r["token_ids"]) for r in point.results)
    streamed_total = sum(len(ids) for events in point.tokens.values() for _, ids in events)
    return {"sessions_checked": len(point.results), "tokens": tokens, "tokens_streamed": streamed_total,
            "wrong_output": wrong[:20], "wrong_output_count": len(wrong),
            "stream_mismatch": stream_mismatch[:20], "stream_mismatch_count": len(stream_mismatch),
            "no_reference_count": len(unknown), "errors": len(point.errors),
            "ok": not (wrong or stream_mismatch or unknown or point.errors) and bool(point.results)}


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {"models": {"target": args.target_model, "draft": args.draft_model},
                 "redis": {"url": args.redis_url or None},
                 "edge": {"backend": "replay", "replay_acceptance": args.acceptance, "gamma": args.gamma,
                          "multiplex_verdicts": True, "verdict_timeout_s": 120.0},
                 "sampling": {"temperature": 0.0, "max_new_tokens": args.max_new_tokens},
                 "verifier": {"max_batch_sessions": args.max_batch_sessions}}
    settings = load_settings(overrides)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="specd-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    prompts = [p[: args.max_prompt_chars] for p in read_prompts(args.prompts_file)[: args.prompt_limit]]
    replay_path = log_dir / "replay.json"
    replay = make_replay(settings, prompts, replay_path)
    settings.edge.replay_file = str(replay_path)
    options = LoadTestOptions(edges=args.edges, sessions_per_edge=args.sessions // args.edges,
                              duration_s=args.duration, prompt_texts=prompts, verifiers=args.verifiers,
                              log_dir=log_dir, progress=not args.no_progress)
    (log_dir / "prompts.json").write_text(json.dumps(prompts))
    from specd.generation import redis_url_for

    async with redis_url_for(settings) as (url, _embedded):
        env = child_env(settings, url)
        pool = VerifierPool(env, args.verifiers, log_dir)
        try:
            await pool.start(settings, url, 300)
            point = await run_point(settings, options, url, env, args.sessions, args.gamma,
                                    log_dir / "prompts.json", pool)
        finally:
            await pool.stop()
    check = check_sessions(point, replay, args.max_new_tokens)
    summary = summarise_point(point)
    return {"command": ["python", *sys.argv], "check": check, "summary": summary, "log_dir": str(log_dir)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=1000, help="concurrent sessions (total)")
    parser.add_argument("--edges", type=int, default=4, help="edge processes")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to keep starting sessions")
    parser.add_argument("--verifiers", type=int, default=2)
    parser.add_argument("--redis-url", default="", help="default: an embedded Redis")
    parser.add_argument("--target-model", default="bundled:target")
    parser.add_argument("--draft-model", default="", help="tokenizer folder (default: the target's)")
    parser.add_argument("--prompts-file", type=Path, default=DEFAULT_PROMPTS)
    parser.add_argument("--prompt-limit", type=int, default=200)
    parser.add_argument("--max-prompt-chars", type=int, default=256,
                        help="cut prompts to this many characters (the test is about sessions, not prefill)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--acceptance", type=float, default=0.8)
    parser.add_argument("--max-batch-sessions", type=int, default=64)
    parser.add_argument("--log-dir", type=Path)
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.draft_model = args.draft_model or args.target_model
    configure_logging("warning", "console")
    result = asyncio.run(soak(args))
    check, summary = result["check"], result["summary"]
    print(json.dumps(check, indent=2))
    print(f"{summary['completed_sessions']} sessions, {summary['tokens']} tokens in {summary['wall_s']} s "
          f"({summary['tokens_per_s']} tok/s), round p50 {summary['round_latency_ms']['p50']} ms, "
          f"mean batch {summary['verifier']['mean_batch_size'] if summary['verifier'] else '-'}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
