"""Edge benchmark: draft tokens/s per backend; one session's tokens/s by gamma policy and drafting
ahead, at injected round-trip delays.

    PYTHONPATH=. python benchmarks/edge_backends.py                 # full run (see --help)
    PYTHONPATH=. python benchmarks/edge_backends.py --brief         # seconds: proves it works

Models: the bundled pair (bundled:target / bundled:draft) when it is installed, else tiny random
Llama models built on the fly (tests/tiny_models.py), or --target/--draft folders.

Network delay: ``DelayedBroker`` (defined here, not part of the product) sleeps half the
round-trip delay before each draft is written and half after each verdict is read, so every
round pays the full injected round trip. The verifier runs as its own process (``specd
verifier``, as on a server), the edge session in this one, through an embedded Redis.

Writes benchmarks/results/edge_backends.json and .md (or --out PREFIX).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from broker.embedded import EmbeddedRedis  # noqa: E402
from broker.streams import Broker, Entry, connect  # noqa: E402
from common.models import BUNDLED_DIR  # noqa: E402
from common.sampling import SamplingParams  # noqa: E402
from common.settings import Settings  # noqa: E402
from common.wire import SamplingSpec  # noqa: E402
from edge_worker.backends import create_backend  # noqa: E402
from edge_worker.client import EdgeClient  # noqa: E402
from edge_worker.devices import installed  # noqa: E402
from specd.runtime import edge_config  # noqa: E402

PROMPTS = ["def add(a, b):", "import os", "class Stack:", "for i in range(10):",
           "def __init__(self, name):", "with open(path) as f:"]


class DelayedBroker(Broker):
    """A broker whose drafts and verdicts each take ``one_way_s`` longer (benchmark only)."""

    def __init__(self, *args: Any, one_way_s: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.one_way_s = one_way_s

    async def send_draft(self, sid: str, payload: bytes, tag: bytes | None = None) -> str:
        if self.one_way_s:
            await asyncio.sleep(self.one_way_s)
        return await super().send_draft(sid, payload, tag)

    async def read_verdicts(self, sid: str, last_id: str, block_ms: int) -> list[Entry]:
        entries = await super().read_verdicts(sid, last_id, block_ms)
        if entries and self.one_way_s:
            await asyncio.sleep(self.one_way_s)
        return entries


def pick_models(args: argparse.Namespace, scratch: Path) -> tuple[str, str, str]:
    if args.target and args.draft:
        return args.target, args.draft, "given"
    if (BUNDLED_DIR / "target" / "config.json").is_file():
        return "bundled:target", "bundled:draft", "bundled"
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    tokenizer = tiny_models.build_tokenizer()
    target = tiny_models.random_model(tokenizer, seed=1)
    draft = tiny_models.perturbed_copy(target, 2, args.tiny_noise)
    return (str(tiny_models.save(target, tokenizer, scratch / "target")),
            str(tiny_models.save(draft, tokenizer, scratch / "draft")),
            f"tiny random (tests/tiny_models.py), draft = target + {args.tiny_noise} noise")


def draft_speed(kind: str, draft: str, cache_dir: str, gamma: int, rounds: int) -> dict[str, Any]:
    """Greedy draft tokens/s of one backend: ``rounds`` proposals of ``gamma`` after a prompt."""
    started = time.perf_counter()
    backend = create_backend(kind, draft, Settings(models={"torch_threads": 1}), cache_dir=cache_dir)
    load_s = time.perf_counter() - started
    ids = backend.tokenizer.encode(PROMPTS[0])
    state, context, times = backend.new_state(), list(ids), []
    for seq in range(rounds):
        began = time.perf_counter()
        proposal = backend.propose(state, context, gamma, SamplingParams(), seq, frozenset(), 1)
        times.append(time.perf_counter() - began)
        context = context + proposal.token_ids[:-1] if len(context) < 200 else list(ids)  # a rejection
    per_round = statistics.median(times)
    return {"backend": kind, "device": backend.device, "load_s": round(load_s, 2),
            "converted_now": bool(getattr(backend, "converted", False)),
            "draft_tokens_per_s": round(gamma / per_round, 1), "ms_per_round": round(per_round * 1000, 3)}


async def session_runs(args: argparse.Namespace, target: str, draft: str, cache_dir: str) -> list[dict]:
    """Tokens/s of single sessions, per delay x (fixed gamma | adaptive) x drafting ahead."""
    rows: list[dict] = []
    with EmbeddedRedis() as redis:
        settings = Settings(redis={"url": redis.url, "key_prefix": "bench"},
                            models={"target": target, "draft": draft, "torch_threads": 1},
                            edge={"backend": args.session_backend, "cache_dir": cache_dir,
                                  "gamma_min": 1, "gamma_max": max(args.gammas)})
        verifier = await start_verifier(redis.url, target)
        backend = create_backend(args.session_backend, draft, settings)
        try:
            for delay_ms in args.delays:
                broker = DelayedBroker(connect(redis.url), prefix="bench", one_way_s=delay_ms / 2000)
                for policy in [*(str(g) for g in args.gammas), "adaptive"]:
                    for ahead in (False, True):
                        gamma = args.start_gamma if policy == "adaptive" else int(policy)
                        config = dataclasses.replace(edge_config(settings), gamma=gamma,
                                                     adaptive_gamma=policy == "adaptive", draft_ahead=ahead)
                        client = EdgeClient(backend, broker, config, 1)
                        rows.append(await one_setting(client, args, delay_ms, policy, ahead))
                        print(json.dumps(rows[-1]), flush=True)
                await broker.close()
        finally:
            verifier.terminate()
            verifier.wait(timeout=30)
    return rows


async def start_verifier(url: str, target: str) -> subprocess.Popen[bytes]:
    """``specd verifier`` in its own process; returns once its heartbeat is up."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPECD_REDIS__KEY_PREFIX": "bench",
           "SPECD_VERIFIER__IDLE_BLOCK_MS": "5", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "specd", "verifier", "--redis-url", url,
                                "--target-model", target, "--torch-threads", "1", "--log-level", "warning"],
                               env=env, cwd=ROOT)
    probe = Broker(connect(url), prefix="bench")
    try:
        for _ in range(600):
            if await probe.any_healthy("verifier"):
                return process
            if process.poll() is not None:
                raise RuntimeError("the verifier process exited")
            await asyncio.sleep(0.1)
    finally:
        await probe.close()
    process.terminate()
    raise RuntimeError("the verifier did not come up within 60 s")


async def one_setting(client: EdgeClient, args: argparse.Namespace, delay_ms: float, policy: str,
                      ahead: bool) -> dict[str, Any]:
    tokens = wall = rounds = drafted = accepted = hits = misses = gamma_sum = 0.0
    tokenizer = client.backend.tokenizer
    for _ in range(args.repeats):
        for prompt in PROMPTS[:args.prompts]:
            spec = SamplingSpec(max_new_tokens=args.max_new_tokens)  # greedy, no stop: fixed length
            result = await client.generate(tokenizer.encode(prompt), spec)
            tokens += len(result.token_ids)
            wall += result.wall_ms / 1000
            rounds += result.rounds
            drafted += result.drafted
            accepted += result.accepted
            hits += result.ahead_hits
            misses += result.ahead_misses
            gamma_sum += sum(result.gammas)
    return {"delay_ms": delay_ms, "gamma": policy, "draft_ahead": ahead,
            "tokens_per_s": round(tokens / wall, 2), "acceptance": round(accepted / max(drafted, 1), 3),
            "tokens_per_round": round(tokens / max(rounds, 1), 3),
            "mean_gamma": round(gamma_sum / max(rounds, 1), 2), "ahead_hits": int(hits),
            "ahead_misses": int(misses), "tokens": int(tokens), "wall_s": round(wall, 3)}


def summarise(rows: list[dict]) -> list[dict]:
    """Per delay: best fixed gamma vs adaptive, and drafting ahead vs not."""
    out = []
    for delay in sorted({r["delay_ms"] for r in rows}):
        at = [r for r in rows if r["delay_ms"] == delay]
        entry: dict[str, Any] = {"delay_ms": delay}
        for ahead in (False, True):
            fixed = [r for r in at if r["gamma"] != "adaptive" and r["draft_ahead"] is ahead]
            best = max(fixed, key=lambda r: r["tokens_per_s"])
            adaptive = next(r for r in at if r["gamma"] == "adaptive" and r["draft_ahead"] is ahead)
            tag = "ahead" if ahead else "plain"
            entry[f"{tag}_best_fixed_gamma"] = best["gamma"]
            entry[f"{tag}_best_fixed_tps"] = best["tokens_per_s"]
            entry[f"{tag}_adaptive_tps"] = adaptive["tokens_per_s"]
            entry[f"{tag}_adaptive_vs_best"] = round(adaptive["tokens_per_s"] / best["tokens_per_s"], 3)
        entry["ahead_speedup_best"] = round(entry["ahead_best_fixed_tps"] / entry["plain_best_fixed_tps"], 3)
        entry["ahead_speedup_adaptive"] = round(entry["ahead_adaptive_tps"] / entry["plain_adaptive_tps"], 3)
        out.append(entry)
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Edge backends benchmark", "", f"Run: `{report['command']}`  ",
             f"Models: {report['models']}; {report['note']}", "",
             "## Draft tokens/s per backend (greedy)", "",
             "| backend | device | tokens/s | ms per round | load s | converted now |",
             "|---|---|---|---|---|---|"]
    for r in report["draft_speed"]:
        lines.append(f"| {r['backend']} | {r['device']} | {r['draft_tokens_per_s']} | {r['ms_per_round']} | "
                     f"{r['load_s']} | {r['converted_now']} |")
    lines += ["", f"## Single session, {report['session_backend']} draft: tokens/s", "",
              "| delay ms | gamma | draft ahead | tokens/s | acceptance | tokens/round | mean gamma "
              "| hits/misses |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["sessions"]:
        lines.append(f"| {r['delay_ms']} | {r['gamma']} | {r['draft_ahead']} | {r['tokens_per_s']} | "
                     f"{r['acceptance']} | {r['tokens_per_round']} | {r['mean_gamma']} | "
                     f"{r['ahead_hits']}/{r['ahead_misses']} |")
    lines += ["", "## Summary", "", "| delay ms | best fixed (plain) | adaptive/best (plain) | "
              "best fixed (ahead) | adaptive/best (ahead) | ahead speedup (best fixed) | "
              "ahead speedup (adaptive) |", "|---|---|---|---|---|---|---|"]
    for s in report["summary"]:
        lines.append(f"| {s['delay_ms']} | g={s['plain_best_fixed_gamma']} {s['plain_best_fixed_tps']} | "
                     f"{s['plain_adaptive_vs_best']} | g={s['ahead_best_fixed_gamma']} "
                     f"{s['ahead_best_fixed_tps']} | {s['ahead_adaptive_vs_best']} | "
                     f"{s['ahead_speedup_best']} | {s['ahead_speedup_adaptive']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target")
    parser.add_argument("--draft")
    parser.add_argument("--tiny-noise", type=float, default=0.1,
                        help="without the bundled pair: the tiny draft's weight noise (sets acceptance)")
    parser.add_argument("--backends", nargs="+", default=["torch", "openvino", "genai"])
    parser.add_argument("--session-backend", default="torch", help="draft backend of the session runs")
    parser.add_argument("--delays", nargs="+", type=float, default=[0, 20, 80], help="round trips, ms")
    parser.add_argument("--gammas", nargs="+", type=int, default=[1, 2, 3, 4, 6, 8])
    parser.add_argument("--start-gamma", type=int, default=4, help="adaptive gamma's first round")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--draft-rounds", type=int, default=200)
    parser.add_argument("--cache-dir", default="", help="converted models (default: a temp folder)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "edge_backends"))
    parser.add_argument("--brief", action="store_true", help="tiny sizes: proves the script works")
    args = parser.parse_args(argv)
    if args.brief:
        args.gammas, args.prompts, args.repeats = [2, 4], 2, 1
        args.max_new_tokens, args.draft_rounds = 24, 30
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="specd-bench-") as scratch:
        cache_dir = args.cache_dir or str(Path(scratch) / "cache")
        target, draft, models = pick_models(args, Path(scratch))
        speeds = [draft_speed(kind, draft, cache_dir, 4, args.draft_rounds)
                  for kind in args.backends if installed(kind)]
        for speed in speeds:
            print(json.dumps(speed), flush=True)
        rows = asyncio.run(session_runs(args, target, draft, cache_dir))
    report = {"command": "PYTHONPATH=. python benchmarks/edge_backends.py " + " ".join(argv or sys.argv[1:]),
              "models": models, "brief": args.brief, "session_backend": args.session_backend,
              "note": ("BRIEF RUN (tiny sizes, noisy shared CPU): proves the script works, not a measurement"
                       if args.brief else "full run"),
              "torch_threads": 1, "draft_speed": speeds, "sessions": rows, "summary": summarise(rows)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
