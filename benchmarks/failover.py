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


def start_pool(count: int, env: dict[str, str], log_dir: Path) -> subprocess.Popen[bytes]:
    """``specd verifier --workers N --worker-id v``: one parent, children v-0 .. v-(N-1)."""
    log = (log_dir / "verifiers.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "specd", "verifier", "--workers", str(count),
                             "--worker-id", "v"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


async def holds_pending_draft(broker: Any, sid: str, worker: str) -> bool:
    from redis.exceptions import ResponseError

    from broker.streams import GROUP

    try:
        pending = await broker.redis.xpending(broker.keys.drafts(sid), GROUP)
    except ResponseError:  # the session just finished: its stream is gone
        return False
    consumers = {(c["name"].decode() if isinstance(c["name"], bytes) else c["name"])
                 for c in pending.get("consumers", [])}
    return bool(pending["pending"]) and worker in consumers


async def kill_mid_batch(pool: Any, broker: Any, victim: str, timeout: float) -> tuple[float, list[str]]:
    """SIGKILL ``victim`` (pid from its published load) once it holds an unacknowledged draft."""
    pid = int((await pool.loads(fresh_s=30))[victim]["pid"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        owners = {k.decode(): v.decode() for k, v in (await pool.redis.hgetall(pool.owners_key)).items()}
        mine = [sid for sid, owner in owners.items() if owner == victim]
        for sid in mine:
            if await holds_pending_draft(broker, sid, victim):
                os.kill(pid, signal.SIGKILL)
                return time.time(), mine
        await asyncio.sleep(0.005)
    raise RuntimeError(f"{victim} never held a pending draft")


async def pool_status_json(env: dict[str, str]) -> dict[str, Any]:
    """`specd pool status --json` as a process, as an operator would run it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "specd", "pool", "status", "--json", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"specd pool status failed: {err.decode()}")
    status: dict[str, Any] = json.loads(out)
    return status


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
                       max_new_tokens: int = 32, gamma: int = 3, lease_ms: int = 1500,
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
    env = worker_env(redis_url, target, draft, prefix, lease_ms)
    parent = start_pool(workers, env, log_dir)
    names = [f"v-{i}" for i in range(workers)]
    settings = Settings(redis={"url": redis_url, "key_prefix": prefix},
                        models={"target": target, "draft": draft, "torch_threads": 1},
                        edge={"gamma": gamma, "verdict_timeout_s": 60, "max_concurrent_sessions": sessions})
    broker = make_broker(settings)
    pool = PoolBroker(broker)
    try:
        await wait_for_workers(pool, set(names), {"parent": parent}, timeout=180)
        status = await pool_status_json(env)
        edge = build_edge(settings, broker)
        tokenizer = edge.backend.tokenizer
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(sessions)]
        spec = SamplingSpec(max_new_tokens=max_new_tokens)
        runs = asyncio.gather(*(edge.generate(tokenizer.encode(p), spec) for p in prompts))
        victim = names[1]
        killed_at, orphans = await kill_mid_batch(pool, broker, victim, timeout=120)
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
                "takeover_last_s": max(takeovers, default=None), "log_dir": str(log_dir),
                "status_workers": sorted(status["workers"]),
                "status_fields": sorted(next(iter(status["workers"].values()), {})),
                "parent_exit": stop_pool(parent)}
    finally:
        stop_pool(parent)
        await broker.close()


def stop_pool(parent: subprocess.Popen[bytes]) -> int:
    """SIGTERM the --workers parent (it forwards to its children); its exit code."""
    if parent.poll() is None:
        parent.send_signal(signal.SIGTERM)
    try:
        return parent.wait(timeout=60)
    except subprocess.TimeoutExpired:
        parent.kill()
        return parent.wait()


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


def run_with_pool(args: argparse.Namespace, runner: Any) -> dict[str, Any]:
    """The pool benchmarks' common frame: quiet logs, one torch thread, the given models (or a
    tiny pair built here), the given Redis (or a private one), then the report saved to --out."""
    import torch

    from common.logs import configure_logging

    configure_logging("warning", "console")  # keep stdout for the JSON report
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        target, draft = (args.target, args.draft) if args.target else tiny_pair(folder)
        server, url = (None, args.redis_url) if args.redis_url else private_redis(folder)
        try:
            report: dict[str, Any] = asyncio.run(runner(url, target, draft))
        finally:
            if server is not None:
                server.terminate()
                server.wait()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--target", default="")
    parser.add_argument("--draft", default="")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=9)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--gamma", type=int, default=3)
    parser.add_argument("--lease-ms", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "failover.json")
    args = parser.parse_args()
    report = run_with_pool(args, lambda url, target, draft: run_failover(
        url, target, draft, args.workers, args.sessions, args.max_new_tokens, args.gamma, args.lease_ms))
    print(json.dumps(report))
    return 0 if not report["mismatches"] else 1


if __name__ == "__main__":
    sys.exit(main())
