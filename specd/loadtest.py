"""``specd loadtest``: a verifier pool against N edge worker processes with M sessions each.

The pool is started here (``--verifiers N`` processes of ``specd verifier``, on an embedded Redis
when no URL is given) or is an existing one (``--redis-url URL --no-verifiers``). Edge processes
(``python -m specd.loadedge``) load their draft backend, report ``ready``, and start together on a
``go`` line, so loading is never measured. They stream JSON events on stdout; the verifiers'
JSON logs give the batch sizes, compute time and queueing; a pinger samples the Redis round trip.
A sweep (``--sweep-sessions``, ``--sweep-gamma``) runs one point per combination on one pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from broker.reach import redacted
from broker.streams import make_broker
from common.procs import child_env, dies_with_parent
from common.settings import Settings
from specd.generation import redis_url_for
from specd.loadreport import PointData, print_table, read_verifier_rounds, summarise_point, write_plots
from specd.runtime import draft_gamma

LINE_LIMIT = 1 << 22  # bytes of one event line on an edge's stdout


class LoadTestError(Exception):
    """The pool or an edge worker could not start; the message says where its log is."""


@dataclass
class LoadTestOptions:
    edges: int = 4
    sessions_per_edge: int = 8
    duration_s: float = 0.0
    prompts: int = 0
    """Sessions to run per point; 0: one per slot, or as many as fit in ``duration_s``."""
    prompt_texts: list[str] = field(default_factory=list)
    verifiers: int = 1
    start_verifiers: bool = True
    sweep_sessions: list[int] = field(default_factory=list)
    """Total concurrent sessions per point (split over the edges)."""
    sweep_gamma: list[int] = field(default_factory=list)
    log_dir: Path = Path("loadtest-logs")
    progress: bool = True
    ready_timeout_s: float = 300.0


def split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal non-negative integers."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class VerifierPool:
    """``count`` verifier processes, logs in ``log_dir/verifier-<i>.log``."""

    def __init__(self, env: dict[str, str], count: int, log_dir: Path) -> None:
        self.env, self.count, self.log_dir = env, count, log_dir
        self.processes: list[asyncio.subprocess.Process] = []
        self.logs = [log_dir / f"verifier-{i}.log" for i in range(count)]

    async def start(self, settings: Settings, url: str, timeout_s: float) -> None:
        for i, log in enumerate(self.logs):
            with log.open("wb") as stderr:
                self.processes.append(await asyncio.create_subprocess_exec(
                    *dies_with_parent([sys.executable, "-m", "specd", "verifier", "--worker-id",
                                       f"loadtest-v{i}"]),
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=stderr, env=self.env))
        await self._wait_healthy(settings, url, timeout_s)

    async def _wait_healthy(self, settings: Settings, url: str, timeout_s: float) -> None:
        broker = make_broker(settings, url)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                alive = [await broker.healthy("verifier", f"loadtest-v{i}") for i in range(self.count)]
                if all(alive):
                    return
                dead = [p for p in self.processes if p.returncode is not None]
                if dead:
                    raise LoadTestError(f"a verifier exited at start-up; see {self.log_dir}/verifier-*.log")
                await asyncio.sleep(0.2)
            raise LoadTestError(f"verifiers not healthy within {timeout_s:.0f}s; see {self.log_dir}")
        finally:
            await broker.close()

    async def stop(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                process.terminate()
        for process in self.processes:
            await process.wait()


@dataclass
class _Edge:
    process: asyncio.subprocess.Process
    ready: asyncio.Event
    log: Path


class _Collector:
    """Receives every edge's events for one point and keeps the live counters."""

    def __init__(self, point: PointData) -> None:
        self.point = point
        self.token_count = 0
        self.verdict_reads = 0
        self.last_finish = 0.0  # perf_counter of the last session result or error

    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "tokens":
            self.point.tokens.setdefault(event["session_id"], []).append((event["t"], event["token_ids"]))
            self.token_count += len(event["token_ids"])
        elif kind == "result":
            self.point.results.append(event)
            self.last_finish = time.perf_counter()
        elif kind == "error":
            self.point.errors.append(event)
            self.last_finish = time.perf_counter()
        elif kind == "done":
            self.verdict_reads += event.get("verdict_reads") or 0


async def _relay(edge: _Edge, collector: _Collector) -> None:
    assert edge.process.stdout is not None
    async for raw in edge.process.stdout:
        try:
            event = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "ready":
            edge.ready.set()
        else:
            collector.handle(event)


async def _start_edges(env: dict[str, str], slots: list[int], sessions: list[int], gamma: int,
                       prompts_path: Path, log_dir: Path, tag: str) -> list[_Edge]:
    edges = []
    for i, (slot, count) in enumerate(zip(slots, sessions, strict=True)):
        log = log_dir / f"edge-{tag}-{i}.log"
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *dies_with_parent([sys.executable, "-m", "specd.loadedge", "--prompts-json",
                                   str(prompts_path), "--offset", str(i), "--stride", str(len(slots)),
                                   "--slots", str(slot), "--sessions", str(count)]),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=stderr, limit=LINE_LIMIT,
                env={**env, "SPECD_EDGE__GAMMA": str(gamma), "SPECD_EDGE__WORKER_ID": f"loadtest-e{i}",
                     "SPECD_EDGE__MAX_CONCURRENT_SESSIONS": str(slot)})
        edges.append(_Edge(process, asyncio.Event(), log))
    return edges


async def _await_ready(edges: list[_Edge], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for edge in edges:
        while not edge.ready.is_set():
            if edge.process.returncode is not None or time.monotonic() > deadline:
                raise LoadTestError(f"an edge worker did not start; see {edge.log}")
            await asyncio.sleep(0.1)


async def _ping_loop(settings: Settings, url: str, pings: list[float], every_s: float = 0.25) -> None:
    broker = make_broker(settings, url)
    try:
        while True:
            with contextlib.suppress(Exception):
                pings.append(await broker.ping())
            await asyncio.sleep(every_s)
    finally:
        await broker.close()


async def _progress_loop(collector: _Collector, expected: int, started: float, stream: TextIO) -> None:
    tty = stream.isatty()
    every = 0.5 if tty else 5.0
    while True:
        await asyncio.sleep(every)
        elapsed = time.perf_counter() - started
        point = collector.point
        line = (f"[{elapsed:6.1f}s] {point.sessions} sessions γ={point.gamma}: "
                f"{len(point.results)}{'/' + str(expected) if expected else ''} done, "
                f"{collector.token_count} tokens ({collector.token_count / elapsed:.1f} tok/s), "
                f"{len(point.errors)} errors")
        print(("\r" + line.ljust(100)) if tty else line, end="" if tty else "\n", file=stream, flush=True)


def _plan(options: LoadTestOptions, sessions: int) -> tuple[list[int], list[int]]:
    """Concurrent slots and sessions to run, per edge process."""
    total = options.prompts or (0 if options.duration_s else sessions)
    edges = max(1, min(options.edges, sessions, total or sessions))
    slots = split(sessions, edges)
    counts = split(total, edges) if total else [0] * edges
    return slots, counts


async def run_point(settings: Settings, options: LoadTestOptions, url: str, env: dict[str, str],
                    sessions: int, gamma: int, prompts_path: Path, pool: VerifierPool | None) -> PointData:
    slots, counts = _plan(options, sessions)
    point = PointData(sessions=sessions, gamma=gamma, edges=len(slots),
                      verifiers=pool.count if pool else 0)
    collector = _Collector(point)
    edges = await _start_edges(env, slots, counts, gamma, prompts_path, options.log_dir,
                               f"s{sessions}-g{gamma}")
    relays = [asyncio.create_task(_relay(edge, collector)) for edge in edges]
    background: list[asyncio.Task[None]] = []
    finished = False
    try:
        await _await_ready(edges, options.ready_timeout_s)
        point.started, started = time.time(), time.perf_counter()
        for edge in edges:
            assert edge.process.stdin is not None
            edge.process.stdin.write(f"go {options.duration_s}\n".encode())
            await edge.process.stdin.drain()
        background.append(asyncio.create_task(_ping_loop(settings, url, point.pings_ms)))
        if options.progress:
            background.append(asyncio.create_task(
                _progress_loop(collector, sum(counts), started, sys.stderr)))
        await asyncio.gather(*relays)
        # Until the last session ended: edge processes shutting down is not load.
        point.wall_s = (collector.last_finish or time.perf_counter()) - started
        finished = True
    finally:
        for task in background + relays:
            task.cancel()
        for edge in edges:
            if not finished and edge.process.returncode is None:
                edge.process.kill()
            await edge.process.wait()
        if options.progress and sys.stderr.isatty():
            print(file=sys.stderr)
    point.verdict_reads = collector.verdict_reads
    if pool is not None:
        until = point.started + point.wall_s + 1
        point.verifier_rounds = read_verifier_rounds(pool.logs, point.started, until)
    return point


def sweep(options: LoadTestOptions, settings: Settings) -> list[tuple[int, int]]:
    sessions = options.sweep_sessions or [options.edges * options.sessions_per_edge]
    gammas = options.sweep_gamma or [draft_gamma(settings)]
    return [(s, g) for g in gammas for s in sessions]


async def run_loadtest(settings: Settings, options: LoadTestOptions, out: TextIO = sys.stdout,
                       command: list[str] | None = None) -> dict[str, Any]:
    """Run every point of the sweep; return the JSON report (also printed as a table)."""
    options.log_dir.mkdir(parents=True, exist_ok=True)
    prompts_path = options.log_dir / "prompts.json"
    prompts_path.write_text(json.dumps(options.prompt_texts))
    points = []
    async with redis_url_for(settings) as (url, embedded):
        env = child_env(settings, url)
        pool = VerifierPool(env, options.verifiers, options.log_dir) if options.start_verifiers else None
        print(f"specd loadtest: Redis {'embedded at ' if embedded else ''}{redacted(url)}; "
              f"{options.verifiers if pool else 'existing'} verifier(s); backend {settings.edge.backend}; "
              f"logs in {options.log_dir}", file=out, flush=True)
        try:
            if pool is not None:
                await pool.start(settings, url, options.ready_timeout_s)
            for sessions, gamma in sweep(options, settings):
                point = await run_point(settings, options, url, env, sessions, gamma, prompts_path, pool)
                points.append(summarise_point(point))
        finally:
            if pool is not None:
                await pool.stop()
    report = _report(settings, options, points, "embedded" if embedded else redacted(url), command)
    print_table(points, out)
    return report


def _report(settings: Settings, options: LoadTestOptions, points: list[dict[str, Any]], redis: str,
            command: list[str] | None) -> dict[str, Any]:
    m, e, s = settings.models, settings.edge, settings.sampling
    return {
        "command": command or [], "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "redis": redis, "verifiers": options.verifiers if options.start_verifiers else "existing",
        "edges": options.edges, "duration_s": options.duration_s, "prompts": options.prompts,
        "settings": {"target": m.target, "draft": m.draft, "backend": e.backend,
                     "gamma": draft_gamma(settings), "replay_acceptance": e.replay_acceptance,
                     "network_delay_ms": e.network_delay_ms, "network_jitter_ms": e.network_jitter_ms,
                     "multiplex_verdicts": e.multiplex_verdicts,
                     "temperature": s.temperature, "max_new_tokens": s.max_new_tokens,
                     "max_batch_sessions": settings.verifier.max_batch_sessions,
                     "torch_threads": m.torch_threads or 1},
        "points": points, "summary": points[0] if len(points) == 1 else None,
    }


def finish_outputs(report: dict[str, Any], report_path: Path | None, plot_dir: Path | None,
                   out: TextIO) -> None:
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=2))
        print(f"report: {report_path}", file=out)
    if plot_dir is not None:
        for path in write_plots(report["points"], plot_dir):
            print(f"chart: {path}", file=out)
