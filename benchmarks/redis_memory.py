"""Redis memory and stream lengths over a long run of many short sessions.

Starts verifier processes and runs ``--sessions`` short greedy sessions from an in-process edge,
``--concurrency`` at a time, sampling INFO memory, the key count, the sessions stream length,
the longest per-session stream and the lease registry every ``--sample-every`` sessions. Writes
benchmarks/results/redis_memory.json and prints a summary, including the largest number of
sessions one verifier held at once. For real figures:

    PYTHONPATH=. python benchmarks/redis_memory.py --sessions 5000 --concurrency 64 --max-new-tokens 8

(tiny random models unless --target/--draft; a private redis-server unless --redis-url.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from failover import PROMPTS, ROOT, run_with_pool, start_verifiers, wait_for_workers, worker_env


async def sample(broker: Any, pool: Any, done: int, started: float) -> dict[str, Any]:
    redis = broker.redis
    info = await redis.info("memory")
    longest = 0
    async for key in redis.scan_iter(match=f"{broker.keys.prefix}:{{*}}:*", count=1000):
        if key.endswith((b":drafts", b":verdicts")):
            longest = max(longest, int(await redis.xlen(key)))
    loads = await pool.loads(fresh_s=30)
    return {"sessions_done": done, "seconds": round(time.monotonic() - started, 2),
            "used_memory": int(info["used_memory"]), "keys": int(await redis.dbsize()),
            "sessions_stream": int(await redis.xlen(broker.keys.opens("default"))),
            "longest_session_stream": longest, "leases": int(await redis.zcard(pool.leases_key)),
            "owners": int(await redis.hlen(pool.owners_key)),
            "deadletter": int(await redis.xlen(pool.deadletter_key)),
            "max_sessions_held": max((int(v.get("max_sessions_held", 0)) for v in loads.values()), default=0)}


async def run(url: str, target: str, draft: str, args: argparse.Namespace) -> dict[str, Any]:
    from broker.pool import PoolBroker
    from common.settings import Settings
    from common.wire import SamplingSpec
    from specd.runtime import build_edge, make_broker

    prefix = "mem"
    env = worker_env(url, target, draft, prefix, 3000)
    env["SPECD_VERIFIER__MAX_BATCH_SESSIONS"] = str(args.max_batch_sessions)
    env["SPECD_POOL__FINISHED_TTL_S"] = str(args.finished_ttl_s)
    env["SPECD_REDIS__STREAM_MAXLEN"] = str(args.stream_maxlen)
    processes = start_verifiers(args.workers, env, Path(tempfile.mkdtemp(prefix="redis-memory-")))
    settings = Settings(redis={"url": url, "key_prefix": prefix, "stream_maxlen": args.stream_maxlen},
                        models={"target": target, "draft": draft, "torch_threads": 1},
                        edge={"gamma": 3, "verdict_timeout_s": 300,
                              "max_concurrent_sessions": args.concurrency})
    broker = make_broker(settings)
    pool = PoolBroker(broker)
    samples: list[dict[str, Any]] = []
    try:
        await wait_for_workers(pool, {f"v{i}" for i in range(args.workers)}, processes, timeout=180)
        edge = build_edge(settings, broker)
        tokenizer = edge.backend.tokenizer
        spec = SamplingSpec(max_new_tokens=args.max_new_tokens)
        started, done = time.monotonic(), 0
        samples.append(await sample(broker, pool, 0, started))

        async def one(i: int) -> None:
            nonlocal done
            await edge.generate(tokenizer.encode(PROMPTS[i % len(PROMPTS)]), spec)
            done += 1
            if done % args.sample_every == 0:
                samples.append(await sample(broker, pool, done, started))

        await asyncio.gather(*(one(i) for i in range(args.sessions)))
        samples.append(await sample(broker, pool, done, started))
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            process.wait(timeout=60)
        await broker.close()
    peak = max(samples, key=lambda s: s["used_memory"])
    return {"sessions": args.sessions, "concurrency": args.concurrency, "workers": args.workers,
            "finished_ttl_s": args.finished_ttl_s, "stream_maxlen": args.stream_maxlen,
            "max_new_tokens": args.max_new_tokens, "samples": samples,
            "peak_used_memory": peak["used_memory"], "final": samples[-1],
            "max_keys": max(s["keys"] for s in samples),
            "max_sessions_stream": max(s["sessions_stream"] for s in samples),
            "max_session_stream": max(s["longest_session_stream"] for s in samples),
            "max_sessions_held_by_one_verifier": max(s["max_sessions_held"] for s in samples)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--target", default="")
    parser.add_argument("--draft", default="")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--max-batch-sessions", type=int, default=64)
    parser.add_argument("--sample-every", type=int, default=25)
    parser.add_argument("--finished-ttl-s", type=int, default=60,
                        help="pool.finished_ttl_s: how long finished sessions' verdict streams stay")
    parser.add_argument("--stream-maxlen", type=int, default=1000,
                        help="redis.stream_maxlen (the sessions stream keeps about 10x this)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "redis_memory.json")
    args = parser.parse_args()
    report = run_with_pool(args, lambda url, target, draft: run(url, target, draft, args))
    summary = {k: v for k, v in report.items() if k != "samples"}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
