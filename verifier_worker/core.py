"""What every part of a verifier worker shares, and the writes any part may make for a session.

The worker is composed of parts, each given what it uses (docs/architecture.md):

    WorkerState    settings, brokers, engine, the sessions held, stats, metrics, peers' loads
    SessionWrites  the fenced writes for one session: typed errors, notices, dead letters, its end
    Leases         lease renewal (verifier_worker.leases); SessionWrites re-fences through it
    Admission      session opens (verifier_worker.admission)
    Maintenance    adoption, stuck and stray messages, expiry (verifier_worker.leases)
    Rounds         verification rounds (verifier_worker.rounds)
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import NoPermissionError

from broker.pool import PoolBroker
from broker.rounds import RoundWriter
from broker.streams import SESSION_DATA_ERRORS, Broker, Entry, RoundResult, mac, session_key
from common.logs import get_logger
from common.metrics import VerifierMetrics
from common.settings import Settings, context_length
from common.wire import ErrorCode, ErrorMessage, Limits, WireError, encode
from verifier_worker.engine import TargetEngine
from verifier_worker.session import VerifierSession

log = get_logger("specd.verifier")

Renew = Callable[[list[VerifierSession]], Awaitable[None]]
"""Renew the leases of these sessions (``Leases.renew``): how a refused write re-fences."""


def default_worker_id(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


@dataclass
class VerifierStats:
    forward_passes: int = 0
    rounds: int = 0
    sessions_opened: int = 0
    sessions_adopted: int = 0
    sessions_lost: int = 0
    sessions_finished: int = 0
    opens_passed_on: int = 0
    opens_dropped: int = 0  # opens nobody drafted for, dropped at triage (capacity.triage_open)
    evictions: int = 0
    dead_letters: int = 0
    drafts_throttled: int = 0  # rate-limit notices: a held draft's first, then one per RETELL_S
    forged_drafts: int = 0  # draft-stream entries whose MAC did not verify: dropped unread
    duplicates: int = 0  # drafts delivered again (redelivery, an edge's re-send): dropped or answered
    fenced: int = 0  # writes refused because the lease was no longer this worker's
    repairs: int = 0  # commits that rewrote a context Redis had lost part of
    leases_retaken: int = 0
    max_sessions_held: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=list)


class WorkerState:
    """The verifier's shared state: what it runs, where, and the sessions it holds in memory."""

    def __init__(self, settings: Settings, engine: TargetEngine, broker: Broker, model_name: str,
                 fingerprint: str, worker_id: str = "") -> None:
        self.settings = settings
        self.engine = engine
        self.broker = broker
        self.pool = PoolBroker(broker)
        self.writer = RoundWriter(broker)
        self.model_name = model_name
        self.fingerprint = fingerprint
        self.worker_id = worker_id or settings.verifier.worker_id or default_worker_id("verifier")
        limits = settings.limits
        self.limits = Limits(
            max_message_bytes=limits.max_message_bytes, max_prompt_tokens=limits.max_prompt_tokens,
            max_new_tokens=limits.max_new_tokens, max_gamma=limits.max_gamma,
            max_support=limits.max_support, vocab_size=engine.vocab_size,
        )
        engine.set_kv_budget(settings.pool.kv_budget_tokens)
        self.max_context = context_length(getattr(getattr(engine, "model", None), "config", None))
        self.sessions: dict[str, VerifierSession] = {}
        self.tenant_streams: dict[str, str] = {}  # stream key -> tenant, for every tenant served
        self.stats = VerifierStats()
        self.accepting = True
        self.peers: dict[str, dict[str, Any]] = {}  # live peers' published loads (Leases.tick)
        self.stopping: asyncio.Event | None = None  # set by run(): retries give up once it is set
        self.metrics = VerifierMetrics()
        self.metrics.track(lambda: sum(s.kv.nbytes() for s in list(self.sessions.values())),
                           lambda: sum(len(s.queue) for s in list(self.sessions.values())))
        self.metrics.configured(settings.verifier.max_batch_sessions, settings.pool.kv_budget_tokens)

    def key_of(self, sid: str, nonce: bytes) -> bytes:
        """The session's key (common.integrity): from the pool's secret, never from Redis."""
        return session_key(self.settings.redis.verdict_secret, sid, nonce)

    def hold(self, session: VerifierSession) -> None:
        self.sessions[session.session_id] = session
        self.metrics.session_opened(session.tenant)
        self.stats.max_sessions_held = max(self.stats.max_sessions_held, len(self.sessions))

    def holds(self, session: VerifierSession) -> bool:
        """Whether this very session object is still held (not lost or finished meanwhile)."""
        return self.sessions.get(session.session_id) is session

    def session_limit(self, tenant: str) -> int:
        """The tenant's pool-wide concurrent-session limit; 0: unlimited."""
        return self.settings.tenants.limits(tenant)[0]

    @property
    def tenant_entry_ms(self) -> int:
        """Lifetime of a session's entry in its tenant's set, renewed with the lease.

        It outlives a lapsed lease by one more lease and a scan, so that a dead worker's sessions
        still count until a peer adopts them (adoption renews the entry, it never refuses).
        """
        return 2 * self.settings.pool.lease_ms + self.settings.pool.scan_interval_ms

    def count_error(self, code: ErrorCode) -> None:
        self.stats.errors[code.value] = self.stats.errors.get(code.value, 0) + 1
        self.metrics.error(code.value)

    def drop(self, session: VerifierSession, reason: str) -> None:
        """Forget a session this worker may no longer write (its lease went to another worker)."""
        if self.holds(session):
            del self.sessions[session.session_id]
            self.metrics.session_finished(session.tenant, "lost")
            self.stats.sessions_lost += 1
            self.stats.fenced += reason.startswith("fenced")
            log.warning("session.lost", session_id=session.session_id, reason=reason)
        session.kv.clear()


class SessionWrites:
    """The writes any part makes for a session, each fenced by its lease (or by no lease yet)."""

    def __init__(self, state: WorkerState, renew: Renew) -> None:
        self.state = state
        self.renew = renew

    async def reject_open(self, sid: str | None, entry: Entry, exc: WireError, key: bytes = b"") -> None:
        """A refused open: a typed fatal error to its session (no lease to fence it yet), then ack."""
        broker = self.state.broker
        self.state.count_error(exc.code)
        log.warning("message.rejected", session_id=sid, code=exc.code.value, error=exc.message,
                    stream=entry.stream, entry_id=entry.entry_id)
        if sid is None:
            await broker.ack(entry.stream, entry.entry_id)
            return
        payload = encode(ErrorMessage(sid, exc.code, exc.message, fatal=True))
        await broker.publish_round([RoundResult(sid, payload, [], mac=mac(key, payload))],
                                   ack=(entry.stream, entry.entry_id))

    async def notify(self, session: VerifierSession, message: ErrorMessage, ack_id: str = "") -> bool:
        """A notice or error to a held session's edge, fenced by the lease; False (and dropped) if lost."""
        return await self.fenced_notice(session, encode(message), ack_id)

    async def fenced_notice(self, session: VerifierSession, payload: bytes, ack_id: str = "") -> bool:
        writer = self.state.writer
        tag = mac(session.key, payload)
        try:
            if await writer.notice(session.session_id, session.lease, payload, tag, ack_id):
                return True
        except SESSION_DATA_ERRORS as exc:  # its verdict stream or lease replaced by its tenant
            await self.session_data_failed(session.session_id, exc, session.key, session)
            return False
        lease = session.lease
        await self.renew([session])  # lapsed or lost by Redis, and nobody took it: take it again
        if self.state.holds(session) and session.lease != lease:
            return await writer.notice(session.session_id, session.lease, payload, tag, ack_id)
        self.state.drop(session, "fenced: the lease is no longer this worker's")
        return False

    async def reject(self, session: VerifierSession, entry_id: str, exc: WireError, fatal: bool = False,
                     committed: int = 0) -> None:
        """A draft-stream message that cannot be accepted: a typed error to its edge, the entry acked."""
        self.state.count_error(exc.code)
        log.warning("message.rejected", session_id=session.session_id, code=exc.code.value, error=exc.message,
                    entry_id=entry_id, fatal=fatal)
        await self.notify(session, ErrorMessage(session.session_id, exc.code, exc.message, fatal=fatal,
                                                seq=session.next_seq, committed=committed), entry_id)

    async def dead_letter(self, session: VerifierSession, entry: Entry, error: str, deliveries: int) -> None:
        state = self.state
        state.stats.dead_letters += 1
        await state.pool.dead_letter(entry, error, deliveries, state.settings.pool.deadletter_maxlen)
        log.error("draft.dead_letter", session_id=session.session_id, entry_id=entry.entry_id, error=error)
        notice = ErrorMessage(session.session_id, ErrorCode.DEAD_LETTER, error, fatal=True)
        if await self.notify(session, notice):
            await self.finish(session, ErrorCode.DEAD_LETTER.value)

    async def session_data_failed(self, sid: str, exc: Exception, key: bytes = b"",
                                  session: VerifierSession | None = None) -> None:
        """A session whose keys hold what no verifier wrote (a tenant's wrong-type key, a blocked
        stream id) or that Redis refused: it ends with a typed fatal error on its verdict stream
        where that takes one (else the log says so), its keys are tombstoned and the wrong-typed
        ones deleted, and every other session goes on."""
        state = self.state
        code = ErrorCode.FORBIDDEN if isinstance(exc, NoPermissionError) else ErrorCode.INVALID_STATE
        state.count_error(code)
        log.error("session.invalid_state", session_id=sid, code=code.value, error=str(exc)[:300])
        if session is not None and state.sessions.get(sid) is session:
            del state.sessions[sid]
            state.metrics.session_finished(session.tenant, code.value)
            session.kv.clear()
        payload = encode(ErrorMessage(sid, code, f"the session's Redis keys cannot be used: {exc}"[:500],
                                      fatal=True))
        try:
            bad = await state.pool.condemn(sid, code.value, state.settings.pool.finished_ttl_s)
            if session is not None and state.session_limit(session.tenant):
                await state.pool.leave_session(session.tenant, sid)
            await state.broker.publish_round([RoundResult(sid, payload, [], mac=mac(key, payload))])
        except SESSION_DATA_ERRORS as again:
            log.warning("session.invalid_state_unreported", session_id=sid, error=str(again)[:300])
            return
        if bad:
            log.warning("session.keys_quarantined", session_id=sid, keys=bad)

    async def finish(self, session: VerifierSession, reason: str) -> None:
        state = self.state
        if state.sessions.pop(session.session_id, None) is not None:
            state.metrics.session_finished(session.tenant, reason)
        session.kv.clear()
        state.stats.sessions_finished += 1
        fenced = not await state.writer.finish(session.session_id, session.lease,
                                               state.settings.pool.finished_ttl_s, reason)
        if not fenced:
            await state.pool.forget(session.session_id)
            if state.session_limit(session.tenant):
                await state.pool.leave_session(session.tenant, session.session_id)
        log.info("session.summary", session_id=session.session_id, tenant=session.tenant,
                 reason=reason, rounds=session.rounds, generated=session.generated,
                 drafted=session.drafted, accepted=session.accepted, fenced=fenced,
                 acceptance_rate=round(session.accepted / session.drafted, 4) if session.drafted else None,
                 seconds=round(time.monotonic() - session.opened_at, 3))
