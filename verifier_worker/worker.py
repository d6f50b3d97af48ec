"""The verifier worker: discover sessions, gather drafts, verify them in one pass, publish.

Each iteration reads, in one XREADGROUP, the sessions stream and the draft streams of every
session this worker owns; then it verifies the ready draft of every session (bounded by
``max_batch_sessions`` and ``max_batch_tokens``) in a single target forward pass, publishes all
verdicts and acks in one transaction, and loops. Sessions join and leave between iterations.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from dataclasses import dataclass, field

import numpy as np

from broker.streams import TRANSIENT_ERRORS, Broker, Entry, RoundResult, with_backoff
from common.logs import bind, get_logger
from common.metrics import VerifierMetrics
from common.settings import Settings
from common.wire import (
    DraftBatch,
    ErrorCode,
    ErrorMessage,
    Limits,
    SessionClose,
    SessionOpen,
    Verdict,
    WireError,
    decode,
    encode,
    peek_session_id,
)
from verifier_worker.engine import TargetEngine, VerifyOutcome
from verifier_worker.session import PendingDraft, VerifierSession

log = get_logger("specd.verifier")


def default_worker_id(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


@dataclass
class VerifierStats:
    forward_passes: int = 0
    rounds: int = 0
    sessions_opened: int = 0
    sessions_finished: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=list)


class VerifierWorker:
    def __init__(self, settings: Settings, engine: TargetEngine, broker: Broker, model_name: str,
                 fingerprint: str, worker_id: str = "") -> None:
        self.settings = settings
        self.engine = engine
        self.broker = broker
        self.model_name = model_name
        self.fingerprint = fingerprint
        self.worker_id = worker_id or settings.verifier.worker_id or default_worker_id("verifier")
        limits = settings.limits
        self.limits = Limits(
            max_message_bytes=limits.max_message_bytes, max_prompt_tokens=limits.max_prompt_tokens,
            max_new_tokens=limits.max_new_tokens, max_gamma=limits.max_gamma,
            max_support=limits.max_support, vocab_size=engine.vocab_size,
        )
        self.sessions: dict[str, VerifierSession] = {}
        self.stats = VerifierStats()
        self.accepting = True
        self.metrics = VerifierMetrics()
        self.metrics.track(lambda: sum(s.kv.nbytes() for s in list(self.sessions.values())),
                           lambda: sum(len(s.queue) for s in list(self.sessions.values())))
        self._last_seen: dict[str, float] = {}  # session id -> monotonic time of its last message
        self._next_expiry_check = 0.0

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then drain owned sessions for up to drain_timeout_s."""
        bind(worker_id=self.worker_id)
        await self.startup()
        heartbeat = asyncio.create_task(self._heartbeat_loop())
        try:
            await self._serve(stop)
            self.accepting = False
            deadline = time.monotonic() + self.settings.verifier.drain_timeout_s
            log.info("verifier.draining", sessions=len(self.sessions))
            while self.sessions and time.monotonic() < deadline:
                await self.iterate()
        finally:
            heartbeat.cancel()
            await self.shutdown()

    async def startup(self) -> None:
        await with_backoff(lambda: self.broker.ensure_group(self.broker.keys.sessions),
                           "ensure_group")
        # Session opens this consumer read before a restart but never acknowledged.
        for entry in await self.broker.read_pending(self.worker_id, self.broker.keys.sessions):
            await self._on_open(entry)
        log.info("verifier.started", model=self.model_name, vocab=self.engine.vocab_size)

    async def shutdown(self) -> None:
        # Unfinished sessions keep their pending drafts in Redis for another verifier to claim.
        log.info("verifier.stopped", unfinished_sessions=len(self.sessions),
                 forward_passes=self.engine.forward_passes, rounds=self.stats.rounds)
        try:
            await self.broker.clear_heartbeat("verifier", self.worker_id)
        except Exception as exc:  # noqa: BLE001 - best effort while stopping
            log.warning("verifier.heartbeat_clear_failed", error=str(exc))

    async def _serve(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.iterate()
            except TRANSIENT_ERRORS as exc:  # Redis went away mid-iteration: back off, carry on
                log.warning("verifier.redis_unavailable", error=str(exc))
                await asyncio.sleep(0.5)

    async def _heartbeat_loop(self) -> None:
        ttl = self.settings.verifier.heartbeat_ttl_s
        while True:
            info = json.dumps({"sessions": len(self.sessions), "rounds": self.stats.rounds,
                               "model": self.model_name, "at": time.time()}).encode()
            try:
                await self.broker.heartbeat("verifier", self.worker_id, ttl, info)
            except Exception as exc:  # noqa: BLE001 - the main loop reports broker trouble
                log.warning("verifier.heartbeat_failed", error=str(exc))
            await asyncio.sleep(ttl / 3)

    # ------------------------------------------------------------------ one iteration

    async def iterate(self) -> None:
        ready = any(s.queue for s in self.sessions.values())
        block = None if ready else self.settings.verifier.idle_block_ms
        streams = [self.broker.keys.sessions] if self.accepting else []
        streams += [self.broker.keys.drafts(sid) for sid in self.sessions]
        if streams:
            entries = await with_backoff(
                lambda: self.broker.read_work(self.worker_id, streams, block), "read_work")
            for entry in entries:
                await self._dispatch(entry)
        elif not ready:
            await asyncio.sleep(self.settings.verifier.idle_block_ms / 1000)
        await self._verify_ready()
        await self._expire_idle()

    async def _expire_idle(self) -> None:
        """Drop sessions that sent nothing for the session TTL (their edge is gone): frees their KV."""
        now = time.monotonic()
        if now < self._next_expiry_check:
            return
        self._next_expiry_check = now + 1.0
        ttl = self.broker.ttl
        for session in [s for s in self.sessions.values() if not s.queue]:
            if now - self._last_seen.get(session.session_id, now) > ttl:
                log.warning("session.expired", session_id=session.session_id, tenant=session.tenant,
                            idle_s=ttl)
                await self._finish(session, "expired")

    async def _dispatch(self, entry: Entry) -> None:
        if entry.stream == self.broker.keys.sessions:
            await self._on_open(entry)
            return
        session = self.sessions.get(self.broker.keys.session_of(entry.stream))
        if session is None:  # the session ended while the read was in flight
            await self.broker.ack(entry.stream, entry.entry_id)
            return
        self._last_seen[session.session_id] = time.monotonic()
        try:
            message = decode(entry.payload or b"", self.limits)
            if isinstance(message, SessionClose):
                await self._close(session, entry, message.reason)
            elif isinstance(message, DraftBatch):
                await self._on_draft(session, entry, message)
            else:
                raise WireError(ErrorCode.MALFORMED, f"unexpected {message.type_} on a draft stream")
        except WireError as exc:
            await self._reject(session.session_id, entry, exc, fatal=False)

    async def _on_open(self, entry: Entry) -> None:
        raw = entry.payload or b""
        try:
            message = decode(raw, self.limits)
            if not isinstance(message, SessionOpen):
                raise WireError(ErrorCode.MALFORMED, "expected a session open message")
            self._check_compatible(message)
        except WireError as exc:
            exc.session_id = exc.session_id or peek_session_id(raw)
            if exc.session_id in self.sessions:  # a bad open naming a live session must not end it
                exc.session_id = None
            await self._reject(exc.session_id, entry, exc, fatal=True)
            return
        if message.session_id not in self.sessions:
            await self.broker.ensure_group(self.broker.keys.drafts(message.session_id))
            self.sessions[message.session_id] = VerifierSession.from_open(message)
            self._last_seen[message.session_id] = time.monotonic()
            self.stats.sessions_opened += 1
            self.metrics.session_opened(message.tenant)
            log.info("session.opened", session_id=message.session_id, tenant=message.tenant,
                     prompt_tokens=int(message.prompt_ids.size),
                     max_new_tokens=message.sampling.max_new_tokens,
                     temperature=message.sampling.temperature)
        await self.broker.ack(entry.stream, entry.entry_id)

    def _check_compatible(self, message: SessionOpen) -> None:
        if message.vocab_fingerprint != self.fingerprint:
            raise WireError(
                ErrorCode.TOKENIZER_MISMATCH,
                f"draft {message.draft_model!r} (vocabulary {message.vocab_fingerprint}) is "
                f"incompatible with target {self.model_name!r} (vocabulary {self.fingerprint})",
                message.session_id,
            )
        if message.target_model and message.target_model != self.model_name:
            raise WireError(ErrorCode.MODEL_MISMATCH,
                            f"session expects target {message.target_model!r}, this pool runs "
                            f"{self.model_name!r}", message.session_id)

    async def _on_draft(self, session: VerifierSession, entry: Entry, draft: DraftBatch) -> None:
        if draft.seq < session.next_seq:  # a redelivered or duplicated draft: never recommit
            replay = [RoundResult(session.session_id, session.last_verdict, [entry.entry_id])] \
                if session.last_verdict is not None and draft.seq == session.next_seq - 1 else []
            if replay:
                await self.broker.publish_round(replay)
            else:
                await self.broker.ack(entry.stream, entry.entry_id)
            log.info("draft.duplicate", session_id=session.session_id, seq=draft.seq)
            return
        queued = session.queue[-1].draft.seq + 1 if session.queue else session.next_seq
        if draft.seq != queued:
            raise WireError(ErrorCode.OUT_OF_ORDER, f"draft seq {draft.seq}, expected {queued}")
        session.queue.append(PendingDraft(entry.entry_id, draft, time.time()))

    async def _reject(self, sid: str | None, entry: Entry, exc: WireError, fatal: bool) -> None:
        """Send a typed error to the session (when it can be told), log it, ack the entry."""
        self.stats.errors[exc.code.value] = self.stats.errors.get(exc.code.value, 0) + 1
        self.metrics.error(exc.code.value)
        log.warning("message.rejected", session_id=sid, code=exc.code.value, error=exc.message,
                    stream=entry.stream, entry_id=entry.entry_id)
        if sid is None:
            await self.broker.ack(entry.stream, entry.entry_id)
            return
        payload = encode(ErrorMessage(sid, exc.code, exc.message, fatal=fatal))
        stream_is_session = entry.stream != self.broker.keys.sessions
        await self.broker.publish_round([RoundResult(sid, payload, [entry.entry_id]
                                                     if stream_is_session else [])])
        if not stream_is_session:
            await self.broker.ack(entry.stream, entry.entry_id)

    async def _close(self, session: VerifierSession, entry: Entry, reason: str) -> None:
        await self.broker.ack(entry.stream, entry.entry_id)
        await self._finish(session, reason)

    async def _finish(self, session: VerifierSession, reason: str) -> None:
        if self.sessions.pop(session.session_id, None) is not None:
            self.metrics.session_finished(session.tenant, reason)
        self._last_seen.pop(session.session_id, None)
        session.kv.clear()
        self.stats.sessions_finished += 1
        await self.broker.delete_session(session.session_id)
        log.info("session.summary", session_id=session.session_id, tenant=session.tenant,
                 reason=reason, rounds=session.rounds, generated=session.generated,
                 drafted=session.drafted, accepted=session.accepted,
                 acceptance_rate=round(session.accepted / session.drafted, 4) if session.drafted else None,
                 seconds=round(time.monotonic() - session.opened_at, 3))

    # ------------------------------------------------------------------ verification

    def _select_batch(self) -> list[VerifierSession]:
        """Ready sessions, oldest draft first, within the session and token budgets."""
        ready = sorted((s for s in self.sessions.values() if s.queue),
                       key=lambda s: s.queue[0].received_at)
        batch: list[VerifierSession] = []
        tokens = 0
        budget = self.settings.verifier
        for session in ready:
            cost = session.input_tokens(session.queue[0])
            if batch and (len(batch) >= budget.max_batch_sessions or tokens + cost > budget.max_batch_tokens):
                break
            batch.append(session)
            tokens += cost
        return batch

    async def _verify_ready(self) -> None:
        batch = self._select_batch()
        if not batch:
            return
        pending = [s.queue[0] for s in batch]
        invalid = []
        for session, item in zip(batch, pending, strict=True):
            try:
                session.check_draft(item.draft)
            except WireError as exc:
                invalid.append(session)
                session.queue.popleft()
                await self._reject(session.session_id, Entry(self.broker.keys.drafts(session.session_id),
                                                              item.entry_id, None), exc, fatal=False)
        if invalid:
            batch = [s for s in batch if s not in invalid]
            pending = [s.queue[0] for s in batch]
        if not batch:
            return
        started_wall, started = time.time(), time.perf_counter()
        requests = [s.request(p) for s, p in zip(batch, pending, strict=True)]
        outcomes = await asyncio.to_thread(self.engine.verify, requests)
        verify_ms = (time.perf_counter() - started) * 1000
        self.stats.forward_passes += 1
        self.stats.batch_sizes.append(len(batch))
        self.metrics.observe_batch(len(batch), verify_ms)
        results = [self._complete(s, p, o, started_wall, verify_ms, len(batch))
                   for s, p, o in zip(batch, pending, outcomes, strict=True)]
        await with_backoff(lambda: self.broker.publish_round(results), "publish_round")
        for session in batch:
            if session.finished:
                await self._finish(session, session.finished)

    def _complete(self, session: VerifierSession, pending: PendingDraft, outcome: VerifyOutcome,
                  started_wall: float, verify_ms: float, batch_size: int) -> RoundResult:
        session.queue.popleft()
        draft = pending.draft
        kept, finish = session.commit(draft, outcome)
        queue_ms = max(0.0, (started_wall - draft.sent_at) * 1000) if draft.sent_at else 0.0
        verdict = Verdict(
            session_id=session.session_id, seq=draft.seq, accepted=outcome.accepted,
            token=outcome.token, committed=len(session.context), finish_reason=finish,
            queue_ms=round(queue_ms, 3), verify_ms=round(verify_ms, 3), batch_size=batch_size,
            worker_id=self.worker_id,
        )
        payload = encode(verdict)
        session.last_verdict = payload
        self.stats.rounds += 1
        self.metrics.observe_round(session.tenant, draft.gamma, outcome.accepted, queue_ms)
        log.info("verify.round", session_id=session.session_id, tenant=session.tenant,
                 seq=draft.seq, drafted=draft.gamma, accepted=outcome.accepted, committed=kept,
                 context=len(session.context), batch_size=batch_size, queue_ms=round(queue_ms, 3),
                 verify_ms=round(verify_ms, 3), draft_ms=round(draft.draft_ms, 3), finish=finish)
        state: dict[str | bytes, bytes | str | int] = {
            "context": np.asarray(session.context, dtype="<u4").tobytes(),
            "prompt_len": session.prompt_len, "next_seq": session.next_seq,
            "owner": self.worker_id, "last_verdict": payload,
        }
        return RoundResult(session.session_id, payload, [pending.entry_id], state)
