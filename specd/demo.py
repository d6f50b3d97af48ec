"""``specd demo``: one verifier process and several edge processes on an embedded Redis.

The edges stream their tokens as JSON events on stdout; the demo relays them as they come,
then prints per-session and total figures. Worker logs go to files in ``--log-dir``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from broker.reach import redacted
from broker.streams import short_session_id
from common.procs import child_env, dies_with_parent
from common.settings import Settings
from specd.generation import redis_url_for
from specd.runtime import make_broker

DEFAULT_PROMPTS = [
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n",
    "def read_config(path):\n    with open(path) as f:\n",
    "    for i in range(len(items)):\n",
    "def is_prime(n):\n",
]
"""Code to continue: the bundled tiny pair is a Python code model without a chat template."""

CHAT_PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "What is the capital of France, and what is it famous for?",
    "Explain in two sentences why the sky is blue.",
    "Translate to English: Der Hund läuft schnell über die Straße.",
    "Give me three tips for writing readable code.",
    "What is the difference between a list and a tuple in Python?",
]
"""Questions for an instruct model (the default SmolLM2 pair), sent through its chat template."""


def default_prompts(settings: Settings) -> list[str]:
    """The built-in prompts that suit the configured target: code for the tiny pair, else questions."""
    return list(DEFAULT_PROMPTS if settings.models.target.startswith("bundled:") else CHAT_PROMPTS)


async def _wait_healthy(url: str, settings: Settings, timeout_s: float) -> None:
    broker = make_broker(settings, url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if await broker.any_healthy("verifier"):
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"the verifier did not come up within {timeout_s:.0f}s")
    finally:
        await broker.close()


async def _relay(process: asyncio.subprocess.Process, label: str, out: TextIO,
                 results: list[dict[str, Any]], texts: dict[str, str]) -> None:
    assert process.stdout is not None
    async for raw in process.stdout:
        try:
            event = json.loads(raw)
        except json.JSONDecodeError:
            continue
        sid = event.get("session_id", "")
        tag = f"[{label}/{short_session_id(sid)}]"
        if event["event"] == "tokens":
            texts[sid] = texts.get(sid, "") + event["text"]
            print(f"{tag} {event['text']!r}", file=out, flush=True)
        elif event["event"] == "result":
            results.append(event)
        elif event["event"] == "error":
            print(f"{tag} ERROR {event['code']}: {event['message']}", file=out, flush=True)


async def run_demo(settings: Settings, edges: int, sessions_per_edge: int, prompts: list[str],
                   log_dir: Path | None, out: TextIO = sys.stdout) -> dict[str, Any]:
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="specd-demo-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    async with redis_url_for(settings) as (url, embedded), contextlib.AsyncExitStack() as files:
        print(f"specd demo: Redis {'embedded at ' + redacted(url) if embedded else redacted(url)}; "
              f"1 verifier, {edges} edge workers x {sessions_per_edge} sessions; logs in {log_dir}",
              file=out, flush=True)
        env = child_env(settings, url)  # every setting (the run's verdict secret too), no flags
        verifier = await asyncio.create_subprocess_exec(
            *dies_with_parent([sys.executable, "-m", "specd", "verifier"]),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=files.enter_context(open(log_dir / "verifier.log", "wb")),  # noqa: SIM115
            env=env)
        try:
            await _wait_healthy(url, settings, timeout_s=180)
            started = time.perf_counter()
            results, texts = await _run_edges(env, edges, sessions_per_edge, prompts,
                                              log_dir, out, files)
            wall_s = time.perf_counter() - started
        finally:
            if verifier.returncode is None:
                verifier.terminate()
            await verifier.wait()
    report = summarise(results, wall_s)
    print_report(report, texts, out)
    return report


async def _run_edges(env: dict[str, str], edges: int, sessions_per_edge: int,
                     prompts: list[str], log_dir: Path, out: TextIO,
                     files: contextlib.AsyncExitStack) -> tuple[list[dict[str, Any]], dict[str, str]]:
    results: list[dict[str, Any]] = []
    texts: dict[str, str] = {}
    processes, relays = [], []
    for index in range(edges):
        mine = [prompts[(index * sessions_per_edge + k) % len(prompts)] for k in range(sessions_per_edge)]
        prompt_args = [arg for prompt in mine for arg in ("--prompt", prompt)]
        process = await asyncio.create_subprocess_exec(
            *dies_with_parent([sys.executable, "-m", "specd", "edge", "--chat", *prompt_args, "--events"]),
            stdout=asyncio.subprocess.PIPE,
            stderr=files.enter_context(open(log_dir / f"edge-{index}.log", "wb")),  # noqa: SIM115
            env=env)
        processes.append(process)
        relays.append(_relay(process, f"edge{index}", out, results, texts))
    try:
        await asyncio.gather(*relays)
    finally:  # interrupted or failed: no edge outlives the demo
        for process in processes:
            if process.returncode is None:
                process.terminate()
        for process in processes:
            await process.wait()
    return results, texts


def summarise(results: list[dict[str, Any]], run_s: float) -> dict[str, Any]:
    """Totals; throughput over the generation span (the longest session, all run concurrently),
    so edge processes' start-up (``run_s`` includes it) does not count as generation time."""
    wall_s = max((r["wall_ms"] for r in results), default=0.0) / 1000
    tokens = sum(r["tokens"] for r in results)
    rounds = sum(r["rounds"] for r in results)
    drafted = sum(r["drafted"] for r in results)
    accepted = sum(r["accepted"] for r in results)
    total = {
        "sessions": len(results), "tokens": tokens, "rounds": rounds, "drafted": drafted,
        "accepted": accepted, "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
        "mean_accepted_length": round(tokens / rounds, 3) if rounds else 0.0,
        "tokens_per_s": round(tokens / wall_s, 2) if wall_s else 0.0, "wall_s": round(wall_s, 3),
        "run_s": round(run_s, 3),
        **{key: round(sum(r[key] for r in results), 1)
           for key in ("draft_ms", "queue_ms", "verify_ms", "transport_ms")},
    }
    return {"sessions": results, "total": total}


COLUMNS = [("session", 8), ("tokens", 6), ("rounds", 6), ("drafted", 7), ("accepted", 8),
           ("accept%", 7), ("len/rnd", 7), ("tok/s", 7), ("draft ms", 9), ("queue ms", 9),
           ("verify ms", 9), ("transp ms", 9)]


def _row(r: dict[str, Any], name: str) -> list[str]:
    return [name, str(r["tokens"]), str(r["rounds"]), str(r["drafted"]), str(r["accepted"]),
            f"{100 * r['acceptance_rate']:.1f}", f"{r['mean_accepted_length']:.2f}",
            f"{r['tokens_per_s']:.1f}", f"{r['draft_ms']:.0f}", f"{r['queue_ms']:.0f}",
            f"{r['verify_ms']:.0f}", f"{r['transport_ms']:.0f}"]


def print_report(report: dict[str, Any], texts: dict[str, str], out: TextIO) -> None:
    print("\n=== completions ===", file=out)
    for r in report["sessions"]:
        # a question (chat template) and its answer on their own lines; code runs on from its prefix
        joint = "" if r["prompt"].endswith("\n") else "\n"
        print(f"--- {short_session_id(r['session_id'])} ---\n{r['prompt']}{joint}{r['text']}", file=out)
    print("\n=== figures (times summed over rounds; tok/s per session wall time) ===", file=out)
    header = "  ".join(name.rjust(width) for name, width in COLUMNS)
    print(header, file=out)
    rows = [_row(r, short_session_id(r["session_id"])) for r in report["sessions"]]
    rows.append(_row(report["total"], "TOTAL"))
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, (_, width) in zip(row, COLUMNS, strict=True)),
              file=out)
    total = report["total"]
    print(f"\n{total['sessions']} sessions, {total['tokens']} tokens in {total['wall_s']} s of generation "
          f"({total['tokens_per_s']} tok/s total), acceptance {100 * total['acceptance_rate']:.1f}%, "
          f"mean accepted length {total['mean_accepted_length']} tokens/round; "
          f"{total['run_s']} s including worker start-up", file=out)
