"""One HTTP request = one speculative session: admission, the pool check, rounds out, cancellation.

The session runs as its own task (``EdgeClient.generate``); its rounds come back through the
token callback into a queue. Leaving the iterator early (client gone, stop string found) cancels
the task: the edge session's own clean-up sends the verifier a close, which frees the session's
KV memory. The cancelled task is kept referenced until that clean-up is done.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from broker.streams import Broker, new_session_id
from common.logs import get_logger
from common.wire import SamplingSpec
from edge_worker.client import EdgeClient, SessionFailed, SessionResult, TokenLogprob, new_seed
from specd.serve import errors
from specd.serve.admission import Admission, Release
from specd.serve.metrics import ServeMetrics
from specd.serve.schemas import Generation
from specd.serve.text import Delta, TextStream

log = get_logger("specd.serve")

POOL_CHECK_TTL_S = 1.0  # a pool found healthy is not asked again for this long


@dataclass
class Round:
    delta: Delta
    figures: dict[str, int]  # the round number, its accepted draft tokens and verifier tokens
    logprobs: list[TokenLogprob] | None = None  # of the tokens released with this text, if asked


@dataclass
class Finished:
    text: str
    finish_reason: str
    completion_tokens: int
    figures: dict[str, Any]
    logprobs: list[TokenLogprob] | None = None  # of the completion's tokens, if asked


@dataclass
class _Tally:
    """What the rounds showed, for figures when the session was ended early (a stop string)."""

    started: float = field(default_factory=time.perf_counter)
    rounds: int = 0
    tokens: int = 0
    accepted: int = 0
    first_ms: float = 0.0


class SessionRunner:
    def __init__(self, client: EdgeClient, broker: Broker, max_concurrent: int,
                 pool_check_timeout_s: float = 2.0, queue_size: int = 0,
                 queue_timeout_s: float = 30.0) -> None:
        self.base = client
        self.broker = broker
        self.tokenizer = client.backend.tokenizer
        self.max_concurrent = max_concurrent
        self.pool_check_timeout_s = pool_check_timeout_s
        self.metrics = ServeMetrics()
        self.admission = Admission(max_concurrent, queue_size, queue_timeout_s, self.metrics)
        self._clients = {client.config.tenant: client}
        self._closing: set[asyncio.Task[Any]] = set()
        self._pool_ok_until = 0.0

    async def acquire(self) -> Release:
        """A slot for one request: at once, or after a FIFO wait; 429 past the queue (admission)."""
        return await self.admission.acquire()

    @property
    def active(self) -> int:
        return self.admission.running

    async def check_pool(self) -> None:
        """503 when Redis does not answer in time or no verifier heartbeats; cached briefly."""
        if time.monotonic() < self._pool_ok_until:
            return
        try:
            alive = await asyncio.wait_for(self.broker.any_healthy("verifier"), self.pool_check_timeout_s)
        except asyncio.TimeoutError:
            raise errors.pool_unavailable(
                f"Redis did not answer within {self.pool_check_timeout_s} s") from None
        except Exception as exc:  # noqa: BLE001 - any Redis failure means the same to the caller
            raise errors.pool_unavailable(f"Redis is unreachable ({exc})") from None
        if not alive:
            raise errors.pool_unavailable("no verifier worker is alive (none heartbeats in Redis)")
        self._pool_ok_until = time.monotonic() + POOL_CHECK_TTL_S

    async def wait_closed(self) -> None:
        """Until every cancelled session has told the verifier (shutdown, tests)."""
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    def spec(self, generation: Generation) -> SamplingSpec:
        stops = set(self.base.backend.eos_token_ids) | set(generation.stop_token_ids)
        return SamplingSpec(temperature=generation.temperature, top_p=generation.top_p,
                            top_k=generation.top_k,
                            seed=generation.seed if generation.seed is not None else new_seed(),
                            max_new_tokens=generation.max_tokens, stop_token_ids=tuple(sorted(stops)))

    def session_id(self, tenant: str) -> str:
        return new_session_id(tenant)  # as the edge names them: the tenant's key space (ACLs)

    async def rounds(self, generation: Generation, tenant: str,
                     sid: str) -> AsyncGenerator[Round | Finished, None]:
        """The session's rounds as text deltas, then ``Finished``; raises ``APIError`` on failure."""
        client = self._client_for(tenant)
        queue: asyncio.Queue[list[int] | None] = asyncio.Queue()
        logprobs: list[TokenLogprob] | None = None if generation.logprobs is None else []
        task = asyncio.create_task(client.generate(
            generation.prompt_ids, self.spec(generation), lambda _sid, kept: queue.put_nowait(kept), sid,
            generation.logprobs, None if logprobs is None else lambda _sid, lps: logprobs.extend(lps)))
        task.add_done_callback(lambda _task: queue.put_nowait(None))
        text, tally = TextStream(self.tokenizer, generation.stop), _Tally()
        timeout_s = client.config.verdict_timeout_s + 5.0  # the edge's own bound, plus slack
        try:
            while (kept := await self._next(queue, task, timeout_s)) is not None:
                tally.rounds += 1
                tally.tokens += len(kept)
                tally.accepted += len(kept) - 1  # all but the verifier's token (see module text)
                tally.first_ms = tally.first_ms or (time.perf_counter() - tally.started) * 1000
                delta = text.push(kept, len(kept) - 1)
                if delta.text or (logprobs is not None and delta.tokens):
                    yield Round(delta, {"round": tally.rounds, "accepted": len(kept) - 1, "target": 1},
                                _released(logprobs, text, delta))
                if text.stopped:
                    break
            result = None if text.stopped else await self._result(task)
            tail = text.finish()
            if tail.text or (logprobs is not None and tail.tokens):
                yield Round(tail, {"round": tally.rounds, "accepted": 0, "target": 0},
                            _released(logprobs, text, tail))
            finished = _finished(text, result, tally, sid, tenant)
            finished.logprobs = None if logprobs is None else logprobs[:text.released]
            yield finished
        finally:
            if not task.done():
                task.cancel()
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def _next(self, queue: asyncio.Queue[list[int] | None], task: asyncio.Task[Any],
                    timeout_s: float) -> list[int] | None:
        try:
            return await asyncio.wait_for(queue.get(), timeout_s)
        except asyncio.TimeoutError:
            task.cancel()
            raise errors.pool_unavailable(f"no verdict within {timeout_s:.0f} s") from None

    async def _result(self, task: asyncio.Task[SessionResult]) -> SessionResult:
        try:
            return await task
        except SessionFailed as exc:
            raise errors.session_failed(exc.code.value, str(exc)) from None

    def _client_for(self, tenant: str) -> EdgeClient:
        """The edge client whose sessions carry ``tenant`` (one per API-key tenant).

        They share the draft backend, broker, metrics and the one-forward-at-a-time draft lock:
        the tenant is part of the client's config in edge_worker, not of a session.
        """
        client = self._clients.get(tenant)
        if client is None:
            client = self._clients[tenant] = self.base.for_tenant(tenant)
        return client


def _released(logprobs: list[TokenLogprob] | None, text: TextStream,
              delta: Delta) -> list[TokenLogprob] | None:
    """The logprobs of the tokens ``delta`` released (the last ``delta.tokens`` released so far)."""
    if logprobs is None:
        return None
    return logprobs[text.released - delta.tokens:text.released]


def _finished(text: TextStream, result: SessionResult | None, tally: _Tally, sid: str,
              tenant: str) -> Finished:
    wall_ms = (time.perf_counter() - tally.started) * 1000
    figures: dict[str, Any] = {"session_id": sid, "tenant": tenant, "ttft_ms": round(tally.first_ms, 1),
                               "wall_ms": round(wall_ms, 1)}
    if result is None:  # ended here at a stop string: what the rounds showed
        figures.update(rounds=tally.rounds, tokens=tally.tokens, accepted=tally.accepted,
                       drafted=None, acceptance_rate=None, target_forward_passes=tally.rounds,
                       tokens_per_round=round(tally.tokens / tally.rounds, 3) if tally.rounds else 0.0,
                       tokens_per_s=round(tally.tokens / (wall_ms / 1000), 2) if wall_ms else 0.0)
        return Finished(text.text, "stop", tally.tokens, figures)
    summary = result.summary()
    figures.update({key: summary[key] for key in (
        "rounds", "tokens", "drafted", "accepted", "acceptance_rate", "target_forward_passes",
        "tokens_per_s", "draft_ms", "queue_ms", "verify_ms", "transport_ms")})
    figures["tokens_per_round"] = summary["mean_accepted_length"]
    return Finished(text.text, "stop" if text.stopped else (result.finish_reason or "stop"),
                    len(result.token_ids), figures)
