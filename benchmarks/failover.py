"""Failover: N verifier processes, greedy sessions from an edge, SIGKILL one verifier mid-batch.

Reports the takeover time (from the kill to the first verdict another worker published for a
session the victim owned), checks every output against target-only greedy decoding, and prints
one JSON object. Used by tests/integration/test_pool_failover.py; run it alone with

    PYTHONPATH=. python benchmarks/failover.py --redis-url redis://127.0.0.1:6379/0 \
        --sessions 12 --workers 3 --max-new-tokens 64

(without --target/--draft it builds the tiny random pair of the tests in a temporary folder;
without --redis-url it starts a private redis-server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["def add(a, b):", "import os", "class Stack:", "for i in range(10):", "print(x)",
           "import sys", "def f(x):", "while True:", "x = [1, 2, 3]"]


def worker_env(redis_url: str, target: str, draft: str, prefix: str, lease_ms: int) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "SPECD_REDIS__URL": redis_url,
            "SPECD_REDIS__KEY_PREFIX": prefix, "SPECD_MODELS__TARGET": target,
            "SPECD_MODELS__DRAFT": draft, "SPECD_MODELS__TORCH_THREADS": "1",
            "SPECD_POOL__LEASE_MS": str(lease_ms), "SPECD_POOL__SCAN_INTERVAL_MS": "100",
            "SPECD_POOL__SPREAD_SLACK": "0", "SPECD_VERIFIER__IDLE_BLOCK_MS": "20",
            "SPECD_LOG__FORMAT": "json", "SPECD_LOG__LEVEL": os.environ.get("BENCH_LOG_LEVEL", "warning"),
            "OMP_NUM_THREADS": "1"}


def start_verifiers(count: int, env: dict[str, str], log_dir: Path) -> dict[str, subprocess.Popen[bytes]]:
    processes = {}
    for i in range(count):
        worker = f"v{i}"
        log = (log_dir / f"{worker}.log").open("wb")
        processes[worker] = subprocess.Popen(
            [sys.executable, "-m", "specd", "verifier", "--worker-id", worker], cwd=ROOT, env=env,
            stdout=log, stderr=subprocess.STDOUT)
    return processes


async def wait_for_workers(pool: Any, names: set[str], processes: dict[str, Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not names <= set(await pool.loads(fresh_s=10)):
        dead = [w for w, p in processes.items() if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(f"verifiers did not come up (exited: {dead})")
        await asyncio.sleep(0.2)


async def kill_mid_batch(pool: Any, broker: Any, processes: dict[str, Any], victim: str,
                         timeout: float) -> tuple[float, list[str]]:
    """SIGKILL ``victim`` once it owns sessions and holds an unacknowledged draft (mid-batch)."""
    from broker.streams import GROUP

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        owners = {k.decode(): v.decode() for k, v in (await pool.redis.hgetall(pool.owners_key)).items()}
        mine = [sid for sid, owner in owners.items() if owner == victim]
        for sid in mine:
            pending = await broker.redis.xpending(broker.keys.drafts(sid), GROUP)
            consumers = {(c["name"].decode() if isinstance(c["name"], bytes) else c["name"])
                         for c in pending.get("consumers", [])}
            if pending["pending"] and victim in consumers:
                processes[victim].send_signal(signal.SIGKILL)
                return time.time(), mine
        await asyncio.sleep(0.005)
    raise RuntimeError(f"{victim} never held a pending draft")


async def takeover_times(broker: Any, orphans: list[str], victim: str, killed_at: float) -> list[float]:
    """Per orphaned session: seconds from the kill to the first verdict of another worker."""
    from common.wire import Verdict, decode

    times = []
    for sid in orphans:
        for entry_id, fields in await broker.redis.xrange(broker.keys.verdicts(sid)):
            at_ms = int(entry_id.decode().split("-")[0])
            message = decode(fields[b"m"])
            if isinstance(message, Verdict) and message.worker_id != victim and at_ms / 1000 >= killed_at:
                times.append(round(at_ms / 1000 - killed_at, 3))
                break
    return times


async def run_failover(redis_url: str, target: str, draft: str, workers: int = 3, sessions: int = 9,
                       max_new_tokens: int = 40, gamma: int = 3, lease_ms: int = 1500,
                       log_dir: Path | None = None) -> dict[str, Any]:
    from broker.pool import PoolBroker
    from common.models import load_causal_lm
    from common.sampling import SamplingParams
    from common.settings import Settings
    from common.wire import SamplingSpec
    from specd.runtime import build_edge, make_broker
    from verifier_worker.engine import TargetEngine, generate_target_only

    prefix = f"fo{os.getpid()}{int(time.time())}"
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="failover-"))
    processes = start_verifiers(workers, worker_env(redis_url, target, draft, prefix, lease_ms), log_dir)
    settings = Settings(redis={"url": redis_url, "key_prefix": prefix},
                        models={"target": target, "draft": draft, "torch_threads": 1},
                        edge={"gamma": gamma, "verdict_timeout_s": 60, "max_concurrent_sessions": sessions})
    broker = make_broker(settings)
    pool = PoolBroker(broker)
    try:
        await wait_for_workers(pool, {f"v{i}" for i in range(workers)}, processes, timeout=180)
        edge = build_edge(settings, broker)
        tokenizer = edge.backend.tokenizer
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(sessions)]
        spec = SamplingSpec(max_new_tokens=max_new_tokens)
        runs = asyncio.gather(*(edge.generate(tokenizer.encode(p), spec) for p in prompts))
        victim = "v1"
        killed_at, orphans = await kill_mid_batch(pool, broker, processes, victim, timeout=120)
        results = await runs
        loaded = load_causal_lm(target)
        engine = TargetEngine(loaded.model, loaded.vocab_size)
        mismatches = [p for p, r in zip(prompts, results, strict=True)
                      if r.token_ids != generate_target_only(engine, tokenizer.encode(p), SamplingParams(),
                                                             frozenset(),
                                                             max_new_tokens)]
        takeovers = await takeover_times(broker, orphans, victim, killed_at)
        return {"workers": workers, "sessions": sessions, "victim": victim, "orphaned_sessions": len(orphans),
                "finished_sessions": sum(r.finish_reason is not None for r in results),
                "mismatches": mismatches, "lease_ms": lease_ms, "takeover_s": takeovers,
                "takeover_first_s": min(takeovers, default=None),
                "takeover_last_s": max(takeovers, default=None), "log_dir": str(log_dir)}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        await broker.close()


def tiny_pair(folder: Path) -> tuple[str, str]:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    tokenizer = tiny_models.build_tokenizer()
    model = tiny_models.random_model(tokenizer, seed=1)
    target = tiny_models.save(model, tokenizer, folder / "target")
    draft = tiny_models.save(tiny_models.perturbed_copy(model, 2, 0.35), tokenizer, folder / "draft")
    return str(target), str(draft)


def private_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(folder)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return process, f"redis://127.0.0.1:{port}/0"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--target", default="")
    parser.add_argument("--draft", default="")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=9)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--gamma", type=int, default=3)
    parser.add_argument("--lease-ms", type=int, default=1500)
    args = parser.parse_args()
    import torch

    from common.logs import configure_logging

    configure_logging("warning", "console")  # keep stdout for the JSON report
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        target, draft = (args.target, args.draft) if args.target else tiny_pair(folder)
        server, url = (None, args.redis_url) if args.redis_url else private_redis(folder)
        try:
            report = asyncio.run(run_failover(url, target, draft, args.workers, args.sessions,
                                              args.max_new_tokens, args.gamma, args.lease_ms))
        finally:
            if server is not None:
                server.terminate()
                server.wait()
    print(json.dumps(report))
    return 0 if not report["mismatches"] else 1


if __name__ == "__main__":
    sys.exit(main())
