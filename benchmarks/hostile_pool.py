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

``poison`` (issue 22): Redis with the ACL users `specd acl` prints; ``--waves`` times, three edges
(tenants ``good``, ``good`` and ``other``) run ``--slots`` sessions each at once (8 x 3 x 8 = 192
sessions by default) while tenant ``evil``, from its own process and with only its edge user's
rights, keeps planting wrong-type keys under its sessions' names and opening them, blocking its
own open stream and its sessions' verdict streams with the largest stream id (then deleting the
stream with EXPIRE 0 and starting again), sending drafts that name other sessions, parking
untimed streams, and trying every write outside its ACL; an evil edge runs sessions beside it.
Reports verifier exits, the other tenants' exact/wrong/failed counts, and what evil's own sessions
got (typed errors only).

``restarts``: Redis with AOF (``appendfsync everysec``) is killed (SIGKILL) and started again
``--restarts`` times while sessions run; every session must finish exact or fail with a clear
error within its verdict timeout. Reports the counts of each.

    PYTHONPATH=. python benchmarks/hostile_pool.py soak --out benchmarks/results/hostile_soak.json
    PYTHONPATH=. python benchmarks/hostile_pool.py restarts --out benchmarks/results/redis_restarts.json
    PYTHONPATH=. python benchmarks/hostile_pool.py poison --out benchmarks/results/hostile_poison.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

from broker.streams import FIELD, MAC_FIELD, TRANSIENT_ERRORS, Broker
from common.integrity import mac, session_key
from common.logs import configure_logging
from common.sampling import apply_stop_rules
from common.settings import Settings, load_settings
from common.wire import DraftBatch, SamplingSpec, SessionOpen, encode
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
            "pool": {"lease_ms": 1500, "max_queued_opens": args.max_queued_opens,
                     "open_expiry_s": args.open_expiry},
            "tenants": {
                "names": ["good", "flood", "dup", "other", "evil"],
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
        "first_token_ms_p50": percentile([r.first_token_ms for r in results], 50),
        "first_token_ms_p95": percentile([r.first_token_ms for r in results], 95),
        "round_ms": rounds,
    }


async def flood_opens(url: str, fingerprint: str, rate: float, tenant: str = "flood") -> None:
    """Opens of ``tenant`` at ``rate`` per second, in batches, until SIGTERM; prints how many."""
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
                sid = f"{tenant}.x{sent}"
                payload = encode(SessionOpen(sid, ids, SamplingSpec(max_new_tokens=8), "draft", fingerprint,
                                             tenant=tenant))
                # Signed as the tenant's edge would (the pool here has no verdict_secret): real opens.
                tag = mac(session_key("", sid, b""), payload)
                pipe.xadd(broker.keys.opens(tenant), {FIELD: payload, MAC_FIELD: tag})
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


async def start_flood(url: str, fingerprint: str, rate: float,
                      tenant: str = "flood") -> asyncio.subprocess.Process:
    """The flooding tenant in its own process (the flood does not share our loop), running."""
    flood = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "_flood", "--url", url, "--fingerprint", fingerprint,
        "--flood-rate", str(rate), "--flood-tenant", tenant, stdout=asyncio.subprocess.PIPE,
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


TOP_ID = "18446744073709551615-18446744073709551615"  # the largest stream id: no XADD * after it
ACL_PASSWORD = "bench-pw"


def acl_users(url: str, tenants: list[str]) -> None:
    """The rules `specd acl` prints, applied with ACL SETUSER (the default user stays the harness')."""
    import redis as sync_redis

    from broker.acl import edge_rule, verifier_rule

    admin = sync_redis.Redis.from_url(url)
    rules = [verifier_rule("specd", ACL_PASSWORD), *(edge_rule("specd", t, ACL_PASSWORD) for t in tenants)]
    for rule in rules:
        _, name, *rules = rule.split(" ")
        admin.execute_command("ACL", "SETUSER", name, "reset", *rules)
    admin.close()


def as_user(settings: Settings, user: str) -> Settings:
    settings = settings.model_copy(deep=True)
    settings.redis.username, settings.redis.password = user, ACL_PASSWORD
    return settings


async def poison_keys(url: str, fingerprint: str, period_s: float) -> None:
    """Tenant evil, as its edge ACL user: plants everything its rights allow until SIGTERM, then
    prints a JSON count of each kind of attempt (and of the writes its ACL refused)."""
    import signal

    from redis.exceptions import NoPermissionError, ResponseError

    from broker.streams import connect

    r = connect(url, 5, username="edge-evil", password=ACL_PASSWORD)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    counts: dict[str, int] = {}
    ids = np.asarray([5, 6, 7, 8], np.uint32)

    def opened(sid: str) -> dict[bytes, bytes]:
        spec = SamplingSpec(max_new_tokens=8)
        return signed(encode(SessionOpen(sid, ids, spec, "draft", fingerprint, tenant="evil")), sid)

    async def attempt(kind: str, operation: Any) -> None:
        try:
            await operation
            counts[kind] = counts.get(kind, 0) + 1
        except NoPermissionError:
            counts[kind + "_refused_by_acl"] = counts.get(kind + "_refused_by_acl", 0) + 1
        except ResponseError:
            counts[kind + "_refused"] = counts.get(kind + "_refused", 0) + 1
        except TRANSIENT_ERRORS:  # a loaded machine: Redis answers late; the attacker goes on
            counts["timeouts"] = counts.get("timeouts", 0) + 1

    n = 0
    print("ready", flush=True)
    while not stop.is_set():
        n += 1
        await plant(r, n, attempt, opened)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), period_s)
    print(json.dumps(counts), flush=True)
    await r.aclose()


def signed(payload: bytes, sid: str) -> dict[bytes, bytes]:
    """Stream fields as the session's edge writes them (no verdict_secret in these runs)."""
    return {FIELD: payload, MAC_FIELD: mac(session_key("", sid, b""), payload)}


async def plant(r: Any, n: int, attempt: Any, opened: Any) -> None:
    """One round of tenant evil's attempts (``attempt`` counts each, and each refusal)."""
    opens = "specd:opens:{evil}"
    for key in ("state", "tokens", "lease", "meta"):  # a wrong type under a session's key, then its open
        sid = f"evil.{key}{n}"
        await attempt("wrong_type_" + key, r.xadd(f"specd:{{{sid}}}:{key}", {FIELD: b"x" * 64}))
        await attempt("open", r.xadd(opens, opened(sid)))
    sid = f"evil.v{n}"  # its verdict stream blocked, then opened and drafted
    await attempt("blocked_verdicts", r.xadd(f"specd:{{{sid}}}:verdicts", {FIELD: b"x"}, id=TOP_ID))
    await attempt("open", r.xadd(opens, opened(sid)))
    named = sid if n % 2 else f"evil.other{n}"  # every other draft names another session
    draft = DraftBatch(session_id=named, seq=0, start=4, token_ids=np.asarray([1], np.uint32),
                       support_sizes=np.zeros(0, np.uint16), support_ids=np.zeros(0, np.uint32),
                       support_probs=np.zeros(0, np.float32))
    kind = "draft" if n % 2 else "foreign_draft"
    await attempt(kind, r.xadd(f"specd:{{{sid}}}:drafts", signed(encode(draft), sid)))
    await attempt("untimed_stream", r.xadd(f"specd:{{evil.park{n}}}:junk", {FIELD: b"x" * 4096}))
    await attempt("ghost_drafts", r.xadd(f"specd:{{evil.ghost{n}}}:drafts", {FIELD: b"junk"}))
    # Keys of a session of its own, replaced mid-session: EXPIRE 0 (a stream comes next round).
    await attempt("replaced_state", r.expire(f"specd:{{evil.state{n - 1}}}:state", 0))
    if n % 3 == 0:  # its own open stream blocked by the largest id (opens read before it are deferred)
        await attempt("blocked_opens", r.xadd(opens, {FIELD: b"junk"}, id=TOP_ID))
    elif n % 3 == 1:  # and deleted again, so that its opens flow (and block) once more
        await attempt("opens_reset", r.expire(opens, 0))
    for key in ("specd:opens:{good}", "specd:deferred:{evil}", "specd:{good.1}:verdicts", "specd:workers"):
        await attempt("outside_acl", r.xadd(key, {FIELD: b"x"}, id=TOP_ID))


async def poison(
    args: argparse.Namespace,
    server: RedisServer,
    settings: Settings,
    replay: ReplayFile,
    prompts: list[list[int]],
) -> dict[str, Any]:
    edges = [edge_for(as_user(settings, f"edge-{t}"), t, args.slots) for t in ("good", "good", "other")]
    evil_edge = edge_for(as_user(settings, "edge-evil"), "evil", 4)
    poisoner = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "_poison", "--url", server.url, "--fingerprint", replay.fingerprint,
        "--poison-period", str(args.poison_period), stdout=asyncio.subprocess.PIPE)
    assert poisoner.stdout is not None
    await asyncio.wait_for(poisoner.stdout.readline(), 300)  # "ready": planting from now on
    await asyncio.sleep(2.0)
    evil_stop = asyncio.Event()
    evil_outcomes: dict[str, int] = {}

    async def evil_sessions() -> None:  # the poisoned tenant's own edge: typed failures only
        while not evil_stop.is_set():
            try:
                await evil_edge.generate(prompts[0], SamplingSpec(max_new_tokens=args.max_new_tokens))
                kind = "finished"
            except SessionFailed as exc:
                kind = f"failed_{exc.code.value}"
            except Exception as exc:  # noqa: BLE001 - counted: an untyped error is a finding
                kind = f"untyped_{type(exc).__name__}"
            evil_outcomes[kind] = evil_outcomes.get(kind, 0) + 1

    evil_task = asyncio.create_task(evil_sessions())
    waves, batches = [], []
    for _ in range(args.waves):
        batch = await asyncio.gather(*(run_sessions(e, prompts, replay, args.slots, args.max_new_tokens)
                                       for e in edges))
        batches += batch
        waves.append(pooled(batch))
    evil_stop.set()
    evil_task.cancel()  # a session of its own may wait out its verdict timeout: not measured
    with contextlib.suppress(asyncio.CancelledError):
        await evil_task
    poisoner.terminate()
    out, _ = await poisoner.communicate()
    for edge in (*edges, evil_edge):
        await edge.broker.close()
    totals = pooled(batches)
    return {
        "sessions": len(edges) * args.slots * args.waves,
        "waves": len(waves), "slots": args.slots, "edges": len(edges),
        "other_tenants": totals,
        "waves_detail": waves,
        "evil_sessions": evil_outcomes,
        "evil_attempts": _last_json(out.decode()),
    }


async def selfflood(
    args: argparse.Namespace,
    server: RedisServer,
    settings: Settings,
    replay: ReplayFile,
    prompts: list[list[int]],
) -> dict[str, Any]:
    """Issue 22, finding 4: tenant good's live sessions beside its own backlog. Quiet runs, then runs
    each opened right after ``--burst`` idle opens of good (no edge behind them) were queued on
    good's own stream, while the flood process keeps adding good's opens at ``--flood-rate``."""
    good = edge_for(settings, "good", args.sessions)

    async def phase() -> dict[str, Any]:
        return await run_sessions(good, prompts, replay, args.sessions, args.max_new_tokens)

    await phase()  # warm-up, not compared
    quiet = [await phase() for _ in range(args.repeats)]
    flood = await start_flood(server.url, replay.fingerprint, args.flood_rate, tenant="good")
    flooded = []
    ids = np.asarray([5, 6, 7, 8], np.uint32)
    for run in range(args.repeats):
        async with good.broker.redis.pipeline(transaction=False) as pipe:
            for i in range(args.burst):
                sid = f"good.idle{run}-{i}"
                opened = SessionOpen(sid, ids, SamplingSpec(max_new_tokens=8), "draft", replay.fingerprint,
                                     tenant="good")
                pipe.xadd(good.broker.keys.opens("good"), signed(encode(opened), sid))
            await pipe.execute()
        flooded.append(await phase())
    sent = await stop_flood(flood)
    keys = good.broker.keys
    queued = int(await good.broker.redis.xlen(keys.opens("good"))) + int(
        await good.broker.redis.xlen(keys.deferred("good")))
    await good.broker.close()
    return {
        "quiet": pooled(quiet), "own_backlog": pooled(flooded),
        "quiet_runs": [public(r) for r in quiet], "own_backlog_runs": [public(r) for r in flooded],
        "burst_per_run": args.burst, "flood_rate": args.flood_rate, "flood_opens_sent": sent,
        "opens_still_queued": queued,
        "pool_settings": {k: getattr(settings.pool, k) for k in ("open_expiry_s", "max_queued_opens",
                                                                    "opens_per_read", "adopted_idle_s")},
    }


def _last_json(text: str) -> dict[str, Any]:
    """The poisoner's counts (its last line), or what it said instead when it died."""
    lines = text.strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else {}
    except ValueError:
        return {"poisoner_output": lines[-5:]}


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
        "first_token_ms_p95_max": max((p.get("first_token_ms_p95", 0.0) for p in phases), default=0.0),
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
    if args.mode == "poison":
        acl_users(server.url, ["good", "other", "evil"])
        env.update(SPECD_REDIS__USERNAME="verifier", SPECD_REDIS__PASSWORD=ACL_PASSWORD)
    pool = VerifierPool(env, args.verifiers, folder)
    try:
        await pool.start(settings, server.url, 300)
        run = {"soak": soak, "selfflood": selfflood, "restarts": restarts, "poison": poison}[args.mode]
        result = await run(args, server, settings, replay, prompts)
        result["verifier_exits"] = sum(p.returncode is not None for p in pool.processes)
        result["verifier_exit_codes"] = [p.returncode for p in pool.processes]
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
    parser.add_argument("mode", choices=["soak", "selfflood", "restarts", "poison", "_flood", "_poison"])
    parser.add_argument("--url", help="_flood: the Redis URL")
    parser.add_argument("--fingerprint", help="_flood: the vocabulary fingerprint")
    parser.add_argument("--sessions", type=int, default=24, help="concurrent sessions of the good tenant")
    parser.add_argument("--verifiers", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--acceptance", type=float, default=0.8)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--flood-rate", type=float, default=2000.0, help="soak: flood opens per second")
    parser.add_argument("--flood-tenant", default="flood", help="_flood: the tenant whose stream it floods")
    parser.add_argument("--burst", type=int, default=3000,
                        help="selfflood: idle opens queued at once on the live tenant's own stream")
    parser.add_argument("--max-queued-opens", type=int, default=10000, help="pool.max_queued_opens")
    parser.add_argument("--open-expiry", type=float, default=60.0, help="pool.open_expiry_s")
    parser.add_argument("--flood-limit", type=int, default=2, help="soak: the flooding tenant's max_sessions")
    parser.add_argument("--repeats", type=int, default=3, help="soak: runs of each phase (pooled)")
    parser.add_argument("--waves", type=int, default=8, help="poison: waves of sessions")
    parser.add_argument("--slots", type=int, default=8, help="poison: concurrent sessions per edge (3 edges)")
    parser.add_argument("--poison-period", type=float, default=0.2, help="poison: seconds between plantings")
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
        asyncio.run(flood_opens(args.url, args.fingerprint, args.flood_rate, args.flood_tenant))
        return 0
    if args.mode == "_poison":
        asyncio.run(poison_keys(args.url, args.fingerprint, args.poison_period))
        return 0
    result = asyncio.run(main_async(args))
    print(json.dumps({k: v for k, v in result.items() if k != "batches"}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    if args.mode == "soak":
        return 0 if result["hostile"]["exact"] == args.sessions else 1
    if args.mode == "selfflood":
        return 0 if result["own_backlog"]["wrong"] == 0 else 1
    if args.mode == "poison":
        others = result["other_tenants"]
        return 0 if result["verifier_exits"] == 0 and others["exact"] == others["sessions"] else 1
    return 0 if result["totals"]["wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
