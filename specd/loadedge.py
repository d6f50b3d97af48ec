"""A load-test edge worker process: M session slots running prompts back to back.

Started by ``specd loadtest`` as ``python -m specd.loadedge``; settings come from the SPECD_*
environment the parent sets. The process loads its draft backend, prints a ``ready`` event,
waits for ``go <duration_s>`` on stdin (so model loading is never measured), then runs its
sessions and prints JSON events on stdout: ``tokens`` (per round, with the edge's clock),
``result`` (a session's summary with its per-round latencies), ``error`` and ``done``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from typing import Any

from broker.multiplex import MultiplexedBroker
from broker.streams import make_broker
from common import tracing
from common.logs import bind, configure_logging
from common.settings import Settings, load_settings
from edge_worker.client import EdgeClient, SessionFailed
from specd.runtime import build_edge
from specd.workers import sampling_spec


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")


class _Plan:
    """Which prompt each new session takes, and when to stop starting sessions."""

    def __init__(self, prompts: list[str], offset: int, stride: int, sessions: int) -> None:
        self.prompts, self.offset, self.stride, self.sessions = prompts, offset, stride, sessions
        self.counter = itertools.count()
        self.deadline = float("inf")

    def next_prompt(self) -> tuple[int, str] | None:
        n = next(self.counter)
        if (self.sessions and n >= self.sessions) or time.monotonic() >= self.deadline:
            return None
        index = (self.offset + n * self.stride) % len(self.prompts)
        return index, self.prompts[index]


async def _slot(settings: Settings, client: EdgeClient, plan: _Plan, encoded: dict[str, list[int]]) -> None:
    tokenizer = client.backend.tokenizer
    stops = client.backend.eos_token_ids
    while (job := plan.next_prompt()) is not None:
        index, text = job
        prompt_ids = encoded.setdefault(text, tokenizer.encode(text))
        started = time.time()

        def on_tokens(sid: str, tokens: list[int]) -> None:
            emit({"event": "tokens", "session_id": sid, "token_ids": tokens, "t": time.time()})

        try:
            result = await client.generate(prompt_ids, sampling_spec(settings, stops), on_tokens)
        except SessionFailed as exc:
            emit({"event": "error", "code": exc.code.value, "message": str(exc), "prompt_index": index})
            continue
        emit({"event": "result", "prompt_index": index, "started": started, "ended": time.time(),
              "round_ms": [round(x, 3) for x in result.round_ms], **result.summary()})


async def run(settings: Settings, plan: _Plan, slots: int) -> int:
    # A pool that waits for a free connection: hundreds of sessions send at once (see connect).
    broker = make_broker(settings, max_connections=max(100, slots + 16))
    try:
        client = build_edge(settings, broker)
        emit({"event": "ready", "backend": client.backend.name})
        sys.stdout.flush()
        line = await asyncio.to_thread(sys.stdin.readline)
        parts = line.split()
        if not parts or parts[0] != "go":
            return 1
        duration = float(parts[1]) if len(parts) > 1 else 0.0
        if duration > 0:
            plan.deadline = time.monotonic() + duration
        encoded: dict[str, list[int]] = {}
        await asyncio.gather(*(_slot(settings, client, plan, encoded) for _ in range(slots)))
        mux = _find_mux(client.broker)
        emit({"event": "done", "verdict_reads": mux.reads if mux is not None else None})
    finally:
        sys.stdout.flush()
        await broker.close()
    return 0


def _find_mux(broker: Any) -> MultiplexedBroker | None:
    while broker is not None and not isinstance(broker, MultiplexedBroker):
        broker = getattr(broker, "inner", None)
    return broker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specd.loadedge")
    parser.add_argument("--prompts-json", required=True, help="file holding a JSON list of prompts")
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--slots", type=int, required=True, help="concurrent sessions")
    parser.add_argument("--sessions", type=int, default=0, help="sessions to run (0: until the duration)")
    args = parser.parse_args(argv)
    settings = load_settings()
    configure_logging(settings.log.level, settings.log.format)
    bind(worker_id=settings.edge.worker_id)
    with open(args.prompts_json) as f:
        prompts = json.load(f)
    plan = _Plan(prompts, args.offset, args.stride, args.sessions)
    tracing.configure("specd-loadedge", settings.tracing.otlp_endpoint, settings.tracing.file)
    try:
        return asyncio.run(run(settings, plan, args.slots))
    finally:
        tracing.shutdown()


if __name__ == "__main__":
    sys.exit(main())
