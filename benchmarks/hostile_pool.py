"""A shared pool under a hostile tenant, and under Redis restarts (issue 12, done-means 2 and 3).

Three verifier processes (`specd verifier`) on a private redis-server; edges in this process draft
with the replay backend (the target's own greedy continuation, accepted per token with
probability ``--acceptance``), so the load is cheap and every output has a known exact answer.

``soak``: tenant ``good`` runs ``--sessions`` concurrent sessions ``--repeats`` times alone (quiet),
then ``--repeats`` times while tenant ``flood`` (limit ``--flood-limit`` sessions) floods its open
stream with ``--flood-rate`` opens per second and runs sessions whose every draft is sent twice.
Between them, a control phase runs the same flood process against a Redis of its own: it takes
the same CPU on this machine without reaching the pool, which separates the pool's share of a
slowdown from the flood generator's. Reports, per phase (pooled over its runs, and per run),
exact/wrong/failed counts and the good tenant's round latency (p50/p95), and the p95 ratios to
quiet and to the control.

``restarts``: Redis with AOF (``appendfsync everysec``) is killed (SIGKILL) and started again
``--restarts`` times while sessions run; every session must finish exact or fail with a clear
error within its verdict timeout. Reports the counts of each.

    PYTHONPATH=. python benchmarks/hostile_pool.py soak --out benchmarks/results/hostile_soak.json
    PYTHONPATH=. python benchmarks/hostile_pool.py restarts --out benchmarks/results/redis_restarts.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from broker.streams import FIELD, MAC_FIELD, Broker
from common.integrity import mac, session_key
from common.logs import configure_logging
from common.sampling import apply_stop_rules
from common.settings import Settings, load_settings
from common.wire import SamplingSpec, SessionOpen, encode
from edge_worker.backends.replay import ReplayFile
from edge_worker.client import EdgeClient, SessionFailed, SessionResult
from specd.loadtest import VerifierPool, child_env
from specd.prompts import read_prompts
from specd.replay import make_replay
from specd.runtime import build_draft_backend, edge_config, make_broker

DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "specbench_questions.jsonl"
FALLBACK_PROMPTS = [
    "def add(a, b):",
    "import os",
    "class Stack:",
    "for i in range(10):",
    "The capital of",
    "Once upon a time",
    "SELECT * FROM",
    "# Sort a list",
]


PERSISTENCE = {
    "aof": ("--appendonly", "yes", "--appendfsync", "everysec"),
    "aof-always": ("--appendonly", "yes", "--appendfsync", "always"),
    "none": ("--appendonly", "no"),
}


class RedisServer:
    def __init__(self, folder: Path, *persistence: str) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.folder, self.persistence = folder, persistence
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                str(self.folder),
                *self.persistence,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


class DuplicatingBroker(Broker):
    """An edge broker that sends every draft twice (at-least-once delivery, made systematic)."""

    def __init__(self, inner: Broker) -> None:
        super().__init__(inner.redis, inner.keys.prefix, inner.maxlen, inner.ttl)

    async def send_draft(self, sid: str, payload: bytes, tag: bytes | None = None) -> str:
        await super().send_draft(sid, payload, tag)
        return await super().send_draft(sid, payload, tag)


def percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2) if values else 0.0


def base_settings(url: str, args: argparse.Namespace, replay_path: Path) -> Settings:
    return load_settings(
        {
            "redis": {"url": url, "socket_timeout_s": 5.0},
            "models": {"target": "bundled:target", "draft": "bundled:target"},
            "edge": {
                "backend": "replay",
                "replay_file": str(replay_path),
                "replay_acceptance": args.acceptance,
                "gamma": 4,
                "verdict_timeout_s": args.verdict_timeout,
                "resend_after_s": args.resend_after,
            },
            "sampling": {"temperature": 0.0, "max_new_tokens": args.max_new_tokens},
            "pool": {"lease_ms": 1500},
            "tenants": {
                "names": ["good", "flood", "dup"],
                "overrides": {"flood": {"max_sessions": args.flood_limit}},
            },
        }
    )


def edge_for(settings: Settings, tenant: str, concurrency: int, duplicate: bool = False) -> EdgeClient:
    settings = settings.model_copy(deep=True)
    settings.edge.tenant = tenant
    broker: Broker = make_broker(settings)
    if duplicate:
        broker = DuplicatingBroker(broker)
    return EdgeClient(build_draft_backend(settings), broker, edge_config(settings), concurrency)


async def run_sessions(
    edge: EdgeClient, prompts: list[list[int]], replay: ReplayFile, count: int, max_new: int
) -> dict[str, Any]:
    """``count`` sessions at once; each result checked against the replay reference."""

    async def one(i: int) -> tuple[str, SessionResult | str]:
        prompt = prompts[i % len(prompts)]
        try:
            result = await edge.generate(prompt, SamplingSpec(max_new_tokens=max_new))
        except SessionFailed as exc:
            return "failed", str(exc)
        expected, _ = apply_stop_rules(replay.entries[tuple(prompt)], 0, replay.eos_token_ids, max_new)
        return ("exact" if result.token_ids == expected else "wrong"), result

    started = time.monotonic()
    outcomes = await asyncio.gather(*(one(i) for i in range(count)))
    results = [r for kind, r in outcomes if isinstance(r, SessionResult)]
    rounds = [ms for r in results for ms in r.round_ms]
    return {
        "sessions": count,
        "exact": sum(k == "exact" for k, _ in outcomes),
        "wrong": sum(k == "wrong" for k, _ in outcomes),
        "failed": sum(k == "failed" for k, _ in outcomes),
        "errors": sorted({r for k, r in outcomes if k == "failed"})[:5],
        "rounds": len(rounds),
        "round_ms_p50": percentile(rounds, 50),
        "round_ms_p95": percentile(rounds, 95),
        "resends": sum(r.resends for r in results),
        "rewinds": sum(r.rewinds for r in results),
        "forged": sum(r.forged for r in results),
        "wall_s": round(time.monotonic() - started, 2),
        "round_ms": rounds,
    }


async def flood_opens(url: str, fingerprint: str, rate: float) -> None:
    """Opens of tenant flood at ``rate`` per second, in batches, until SIGTERM; prints how many."""
    import signal

    from broker.streams import connect

    broker = Broker(connect(url, 5), prefix="specd")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    sent, batch = 0, max(1, int(rate / 20))
    ids = np.asarray([5, 6, 7, 8], np.uint32)
    while not stop.is_set():
        async with broker.redis.pipeline(transaction=False) as pipe:
            for _ in range(batch):
                sid = f"flood.x{sent}"
                payload = encode(SessionOpen(sid, ids, SamplingSpec(max_new_tokens=8), "draft", fingerprint,
                                             tenant="flood"))
                # Signed as the tenant's edge would (the pool here has no verdict_secret): real opens.
                tag = mac(session_key("", sid, b""), payload)
                pipe.xadd(broker.keys.opens("flood"), {FIELD: payload, MAC_FIELD: tag})
                sent += 1
            await pipe.execute()
        if sent == batch:
            print("ready", flush=True)
        await asyncio.sleep(0.05)
    print(sent, flush=True)
    await broker.close()


async def soak(
    args: argparse.Namespace,
    server: RedisServer,
    settings: Settings,
    replay: ReplayFile,
    prompts: list[list[int]],
) -> dict[str, Any]:
    good = edge_for(settings, "good", args.sessions)

    async def phase() -> dict[str, Any]:
        return await run_sessions(good, prompts, replay, args.sessions, args.max_new_tokens)

    warmup = await phase()  # not compared
    quiet = [await phase() for _ in range(args.repeats)]
    # Control: the same flood process, aimed at a Redis of its own: it takes the same CPU on this
    # machine but never reaches the pool, which separates the pool's share of a slowdown.
    decoy = RedisServer(Path(tempfile.mkdtemp(prefix="specd-decoy-")), *PERSISTENCE["none"])
    decoy.start()
    try:
        flood = await start_flood(decoy.url, replay.fingerprint, args.flood_rate)
        control = [await phase() for _ in range(args.repeats)]
        await stop_flood(flood)
    finally:
        decoy.kill()
    duplicator = edge_for(settings, "dup", 4, duplicate=True)
    flood = await start_flood(server.url, replay.fingerprint, args.flood_rate)
    hostile, duplicated = [], []
    for _ in range(args.repeats):
        dup_task = asyncio.create_task(run_sessions(duplicator, prompts, replay, 4, args.max_new_tokens))
        hostile.append(await phase())
        duplicated.append(await dup_task)
    opens_flooded = await stop_flood(flood)
    queued = int(await good.broker.redis.xlen(good.broker.keys.opens("flood")))
    for edge in (good, duplicator):
        await edge.broker.close()
    quiet_all, control_all, hostile_all = pooled(quiet), pooled(control), pooled(hostile)
    return {
        "warmup": public(warmup),
        "quiet": quiet_all,
        "control_flood_elsewhere": control_all,
        "hostile": hostile_all,
        "quiet_runs": [public(r) for r in quiet],
        "control_runs": [public(r) for r in control],
        "hostile_runs": [public(r) for r in hostile],
        "flood": {
            "opens_sent": opens_flooded,
            "opens_still_queued": queued,
            "duplicating_sessions": pooled(duplicated),
        },
        "p95_ratio": round(hostile_all["round_ms_p95"] / quiet_all["round_ms_p95"], 3)
        if quiet_all["round_ms_p95"]
        else None,
        "p95_ratio_to_control": round(hostile_all["round_ms_p95"] / control_all["round_ms_p95"], 3)
        if control_all["round_ms_p95"]
        else None,
        "p95_ratio_per_run": [
            round(h["round_ms_p95"] / q["round_ms_p95"], 3) if q["round_ms_p95"] else None
            for q, h in zip(quiet, hostile, strict=True)
        ],
    }


async def start_flood(url: str, fingerprint: str, rate: float) -> asyncio.subprocess.Process:
    """The flooding tenant in its own process (the flood does not share our loop), running."""
    flood = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "_flood", "--url", url, "--fingerprint", fingerprint,
        "--flood-rate", str(rate), stdout=asyncio.subprocess.PIPE,
    )
    assert flood.stdout is not None
    await asyncio.wait_for(flood.stdout.readline(), 120)  # "ready": the flood is on
    await asyncio.sleep(1.0)
    return flood


async def stop_flood(flood: asyncio.subprocess.Process) -> int:
    """Stops the flood; returns how many opens it sent."""
    flood.terminate()
    out, _ = await flood.communicate()
    return int(out.decode().split()[-1] if out.strip() else 0)


def public(phase: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in phase.items() if k != "round_ms"}


def pooled(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts summed and latency percentiles over every round of ``phases``."""
    rounds = [ms for p in phases for ms in p["round_ms"]]
    counts = ("sessions", "exact", "wrong", "failed", "rounds", "resends", "rewinds", "forged")
    return {
        "runs": len(phases),
        **{k: sum(p[k] for p in phases) for k in counts},
        "errors": sorted({e for p in phases for e in p["errors"]})[:5],
        "round_ms_p50": percentile(rounds, 50),
        "round_ms_p95": percentile(rounds, 95),
        "wall_s": round(sum(p["wall_s"] for p in phases), 2),
    }


async def restarts(
    args: argparse.Namespace,
    server: RedisServer,
    settings: Settings,
    replay: ReplayFile,
    prompts: list[list[int]],
) -> dict[str, Any]:
    edge = edge_for(settings, "good", args.sessions)
    stop = asyncio.Event()
    rounds: list[dict[str, Any]] = []

    async def keep_running() -> None:
        while not stop.is_set():
            batch = await run_sessions(edge, prompts, replay, args.sessions, args.max_new_tokens)
            rounds.append(public(batch))

    runner = asyncio.create_task(keep_running())
    kills = []
    for _ in range(args.restarts):
        await asyncio.sleep(args.interval * random.uniform(0.7, 1.3))
        started = time.monotonic()
        server.kill()
        await asyncio.sleep(args.down_s)
        server.start()
        kills.append(round(time.monotonic() - started, 2))
    stop.set()
    await runner
    await edge.broker.close()
    totals = {
        k: sum(r[k] for r in rounds) for k in ("sessions", "exact", "wrong", "failed", "resends", "rewinds")
    }
    return {
        "restarts": len(kills),
        "down_s": kills,
        "batches": rounds,
        "totals": totals,
        "errors": sorted({e for r in rounds for e in r["errors"]})[:10],
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="specd-hostile-"))
    persistence = PERSISTENCE[args.persistence] if args.mode == "restarts" else PERSISTENCE["none"]
    server = RedisServer(folder, *persistence)
    server.start()
    texts = read_prompts(DEFAULT_PROMPTS)[: args.prompts] if DEFAULT_PROMPTS.exists() else FALLBACK_PROMPTS
    texts = [t[:200] for t in texts]
    replay_path = folder / "replay.json"
    settings = base_settings(server.url, args, replay_path)
    replay = make_replay(settings, texts, replay_path)
    prompts = [list(p) for p in replay.entries]
    env = child_env(settings, server.url)
    env["SPECD_TENANTS__NAMES"] = json.dumps(settings.tenants.names)  # child_env writes str(list)
    env["SPECD_TENANTS__OVERRIDES"] = json.dumps(
        {t: v.model_dump(exclude_none=True) for t, v in settings.tenants.overrides.items()}
    )
    pool = VerifierPool(env, args.verifiers, folder)
    try:
        await pool.start(settings, server.url, 300)
        run = soak if args.mode == "soak" else restarts
        result = await run(args, server, settings, replay, prompts)
    finally:
        await pool.stop()
        server.kill()
    return {
        "command": ["python", *sys.argv],
        "mode": args.mode,
        "persistence": args.persistence,
        "verifiers": args.verifiers,
        "sessions": args.sessions,
        "max_new_tokens": args.max_new_tokens,
        "acceptance": args.acceptance,
        "cpu_count": os.cpu_count(),
        "log_dir": str(folder),
        **result,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["soak", "restarts", "_flood"])
    parser.add_argument("--url", help="_flood: the Redis URL")
    parser.add_argument("--fingerprint", help="_flood: the vocabulary fingerprint")
    parser.add_argument("--sessions", type=int, default=24, help="concurrent sessions of the good tenant")
    parser.add_argument("--verifiers", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--acceptance", type=float, default=0.8)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--flood-rate", type=float, default=2000.0, help="soak: flood opens per second")
    parser.add_argument("--flood-limit", type=int, default=2, help="soak: the flooding tenant's max_sessions")
    parser.add_argument("--repeats", type=int, default=3, help="soak: runs of each phase (pooled)")
    parser.add_argument("--restarts", type=int, default=10)
    parser.add_argument(
        "--interval", type=float, default=4.0, help="restarts: seconds between kills (+-30%%)"
    )
    parser.add_argument("--down-s", type=float, default=0.5, help="restarts: seconds Redis stays down")
    parser.add_argument("--persistence", choices=sorted(PERSISTENCE), default="aof",
                        help="restarts: aof (appendfsync everysec), aof-always, none")
    parser.add_argument("--verdict-timeout", type=float, default=30.0)
    parser.add_argument("--resend-after", type=float, default=2.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    configure_logging("error", "console")
    if args.mode == "_flood":
        asyncio.run(flood_opens(args.url, args.fingerprint, args.flood_rate))
        return 0
    result = asyncio.run(main_async(args))
    print(json.dumps({k: v for k, v in result.items() if k != "batches"}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    if args.mode == "soak":
        return 0 if result["hostile"]["exact"] == args.sessions else 1
    return 0 if result["totals"]["wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
