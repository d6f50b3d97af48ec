"""Process entry points: a verifier worker and an edge worker, with lifecycle and health checks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from broker.reach import RedisUnavailable, require_verifier
from broker.streams import Broker, short_session_id
from common.logs import LogSink, bind, get_logger, log_sink
from common.metrics import serve
from common.models import encode_prompt
from common.settings import Settings
from common.wire import SamplingSpec
from edge_worker.client import EdgeClient, SessionFailed, SessionResult, new_seed
from specd.logs import LOG_FIELD, log_stream_key
from specd.runtime import build_edge, build_verifier, open_broker
from specd.signals import drain_then_exit, stopped_exit_code
from verifier_worker.worker import default_worker_id

log = get_logger("specd.workers")


async def run_verifier(settings: Settings) -> int:
    broker = await open_broker(settings)
    try:
        worker = build_verifier(settings, broker)
        stop = asyncio.Event()
        received = drain_then_exit(stop, settings.verifier.drain_timeout_s + 5)
        async with worker_services(settings, broker, worker.metrics.registry):
            await worker.run(stop)
    finally:
        await broker.close()
    return stopped_exit_code(received)


@contextlib.asynccontextmanager
async def worker_services(settings: Settings, broker: Broker, registry: Any) -> AsyncIterator[None]:
    """Around a worker's life: its /metrics endpoint and the drain of its log lines to Redis."""
    server = serve(registry, settings.metrics.port, settings.metrics.host) if settings.metrics.port else None
    if server is not None:
        log.info("metrics.serving", port=settings.metrics.port, host=settings.metrics.host)
    sink = log_sink() if settings.log.redis_stream else None
    drain = (asyncio.create_task(drain_logs(broker, sink, settings.log.redis_stream_maxlen))
             if sink is not None else None)
    try:
        yield
    finally:
        if drain is not None and sink is not None:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
            with contextlib.suppress(asyncio.TimeoutError):  # the last lines, if Redis answers in time
                await asyncio.wait_for(flush_logs(broker, sink, settings.log.redis_stream_maxlen), 5)
        if server is not None:
            server.shutdown()


async def drain_logs(broker: Broker, sink: LogSink, maxlen: int, interval_s: float = 0.2) -> None:
    """Forever: move buffered log lines to the log stream; lines Redis cannot take are dropped."""
    reported, last_report = 0, 0.0
    while True:
        await flush_logs(broker, sink, maxlen)
        if sink.dropped != reported and time.monotonic() - last_report > 10:
            reported, last_report = sink.dropped, time.monotonic()
            log.warning("log.stream_dropped", dropped_total=reported)
        await asyncio.sleep(interval_s)


async def flush_logs(broker: Broker, sink: LogSink, maxlen: int, batch: int = 500) -> int:
    """One pipelined XADD per buffered line (up to ``batch``); returns the lines delivered."""
    lines = sink.take(batch)
    if not lines:
        return 0
    key = log_stream_key(broker.keys.prefix)
    try:
        async with broker.redis.pipeline(transaction=False) as pipe:
            for line in lines:
                pipe.xadd(key, {LOG_FIELD: line.encode()}, maxlen=maxlen, approximate=True)
            await pipe.execute()
    except Exception:  # noqa: BLE001 - Redis down or slow: never let logging hurt the worker
        sink.drop(len(lines))
        return 0
    return len(lines)


async def check_health(settings: Settings, role: str) -> int:
    """Exit code 0 when the worker (or, without a worker id, any worker of the role) is alive."""
    try:
        broker = await open_broker(settings)
    except RedisUnavailable as exc:
        print(f"{role}: health check failed: {exc}", file=sys.stderr)
        return 1
    try:
        worker_id = settings.verifier.worker_id if role == "verifier" else settings.edge.worker_id
        alive = await (broker.healthy(role, worker_id) if worker_id else broker.any_healthy(role))
        print(f"{role} {worker_id or '(any)'}: {'healthy' if alive else 'no heartbeat'}")
        return 0 if alive else 1
    except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
        print(f"{role}: health check failed: {exc}", file=sys.stderr)
        return 1
    finally:
        await broker.close()


@dataclass(frozen=True)
class PromptJob:
    text: str
    session_id: str = ""
    chat: bool = False  # a user message: through the tokenizer's chat template, when it has one


def sampling_spec(settings: Settings, stop_token_ids: Iterable[int]) -> SamplingSpec:
    sampling = settings.sampling
    return SamplingSpec(
        temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
        seed=sampling.seed if sampling.seed is not None else new_seed(),
        max_new_tokens=sampling.max_new_tokens, stop_token_ids=tuple(sorted(stop_token_ids)),
    )


async def run_edge_jobs(settings: Settings, client: EdgeClient, jobs: list[PromptJob],
                        emit: Any) -> list[SessionResult | None]:
    """Run prompts concurrently (bounded by the client); ``emit(event_dict)`` reports progress."""
    tokenizer = client.backend.tokenizer
    stops = client.backend.eos_token_ids

    def on_tokens(sid: str, tokens: list[int]) -> None:
        emit({"event": "tokens", "session_id": sid, "token_ids": tokens,
              "text": tokenizer.decode(tokens, skip_special_tokens=True)})

    async def one(job: PromptJob) -> SessionResult | None:
        prompt_ids = encode_prompt(tokenizer, job.text, job.chat)
        spec = sampling_spec(settings, stops)
        sid = job.session_id or client.session_id()  # known here too: the error line names it
        try:
            result = await client.generate(prompt_ids, spec, on_tokens, sid)
        except SessionFailed as exc:
            emit({"event": "error", "session_id": sid, "code": exc.code.value, "message": exc.message})
            return None
        emit({"event": "result", "prompt": job.text,
              "text": tokenizer.decode(result.token_ids, skip_special_tokens=True),
              **result.summary()})
        return result

    return await asyncio.gather(*(one(job) for job in jobs))


async def run_edge(settings: Settings, jobs: list[PromptJob], events: bool) -> int:
    """An edge worker process: run its prompts against the pool, then exit."""
    broker = await open_broker(settings)
    worker_id = settings.edge.worker_id or default_worker_id("edge")
    bind(worker_id=worker_id)
    heartbeat = asyncio.create_task(_edge_heartbeat(broker, worker_id, settings.edge.heartbeat_ttl_s))
    try:
        # before the draft loads: fail fast, not once per session after edge.verdict_timeout_s
        await require_verifier(broker, settings.redis.url, settings.redis.startup_wait_s)
        client = build_edge(settings, broker)
        log.info("edge.started", backend=client.backend.name, device=client.backend.device,
                 model=client.backend.model_name, sessions=len(jobs))
        async with worker_services(settings, broker, client.metrics.registry):
            results = await run_edge_jobs(settings, client, jobs, _printer(events))
    finally:
        heartbeat.cancel()
        with contextlib.suppress(Exception):  # best effort: Redis may be gone (the key has a TTL)
            await broker.clear_heartbeat("edge", worker_id)
        await broker.close()
    return 0 if all(r is not None for r in results) else 1


async def _edge_heartbeat(broker: Broker, worker_id: str, ttl: int) -> None:
    while True:
        try:
            await broker.heartbeat("edge", worker_id, ttl, b"{}")
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            log.warning("edge.heartbeat_failed", error=str(exc))
        await asyncio.sleep(ttl / 3)


def _printer(events: bool) -> Any:
    def emit(event: dict[str, Any]) -> None:
        if events:
            print(json.dumps(event), flush=True)
        elif event["event"] == "result":
            print(f"[{short_session_id(event['session_id'])}] {event['prompt']}{event['text']}", flush=True)
        elif event["event"] == "error":
            sid = short_session_id(event["session_id"])
            print(f"[{sid}] error {event['code']}: {event['message']}", flush=True)

    return emit
