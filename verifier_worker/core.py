"""What every part of a verifier worker shares: its settings, brokers, sessions, stats, and the
writes any part may make for a session (typed errors, notices, the end of a session).

The worker is split by responsibility (``worker``: loop and lifecycle; ``admission``: session
opens; ``leases``: leases, adoption and failover; ``rounds``: verification rounds); each part is
a mixin over this core, so a newcomer reads one part with this file beside it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from broker.pool import PoolBroker
from broker.rounds import RoundWriter
from broker.streams import Broker, Entry, RoundResult, mac, session_key
from common.logs import get_logger
from common.metrics import VerifierMetrics
from common.settings import Settings, context_length
from common.wire import ErrorCode, ErrorMessage, Limits, WireError, encode
from verifier_worker.engine import TargetEngine
from verifier_worker.scheduler import DrrScheduler
from verifier_worker.session import VerifierSession
from verifier_worker.tenants import DraftThrottle

log = get_logger("specd.verifier")


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


class WorkerCore:
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
        self.scheduler = DrrScheduler()
        self.throttle = DraftThrottle()
        self.peers: dict[str, dict[str, Any]] = {}  # live peers' published loads
        self.pool_load = 0.0
        self._next_scan = 0.0
        self._next_tenant_scan = 0.0
        self._opens_paused_until = 0.0
        self.stopping: asyncio.Event | None = None  # set by run(): retries give up once it is set
        self.metrics = VerifierMetrics()
        self.metrics.track(lambda: sum(s.kv.nbytes() for s in list(self.sessions.values())),
                           lambda: sum(len(s.queue) for s in list(self.sessions.values())))
        self.metrics.configured(settings.verifier.max_batch_sessions, settings.pool.kv_budget_tokens)

    async def _dispatch(self, entry: Entry) -> None:  # the worker loop's (verifier_worker.worker)
        raise NotImplementedError

    def _key_of(self, sid: str, nonce: bytes) -> bytes:
        """The session's key (common.integrity): from the pool's secret, never from Redis."""
        return session_key(self.settings.redis.verdict_secret, sid, nonce)

    def _hold(self, session: VerifierSession) -> None:
        self.sessions[session.session_id] = session
        self.metrics.session_opened(session.tenant)
        self.stats.max_sessions_held = max(self.stats.max_sessions_held, len(self.sessions))

    def _session_limit(self, tenant: str) -> int:
        """The tenant's pool-wide concurrent-session limit; 0: unlimited."""
        return self.settings.tenants.limits(tenant)[0]

    def _count_error(self, code: ErrorCode) -> None:
        self.stats.errors[code.value] = self.stats.errors.get(code.value, 0) + 1
        self.metrics.error(code.value)

    async def _reject_open(self, sid: str | None, entry: Entry, exc: WireError, key: bytes = b"") -> None:
        """A refused open: a typed fatal error to its session (no lease to fence it yet), then ack."""
        self._count_error(exc.code)
        log.warning("message.rejected", session_id=sid, code=exc.code.value, error=exc.message,
                    stream=entry.stream, entry_id=entry.entry_id)
        if sid is None:
            await self.broker.ack(entry.stream, entry.entry_id)
            return
        payload = encode(ErrorMessage(sid, exc.code, exc.message, fatal=True))
        await self.broker.publish_round([RoundResult(sid, payload, [], mac=mac(key, payload))],
                                        ack=(entry.stream, entry.entry_id))

    async def _notify(self, session: VerifierSession, message: ErrorMessage, ack_id: str = "") -> bool:
        """A notice or error to a held session's edge, fenced by the lease; False (and dropped) if lost."""
        return await self._fenced_notice(session, encode(message), ack_id)

    async def _fenced_notice(self, session: VerifierSession, payload: bytes, ack_id: str = "") -> bool:
        tag = mac(session.key, payload)
        if await self.writer.notice(session.session_id, session.lease, payload, tag, ack_id):
            return True
        lease = session.lease
        await self.renew_leases([session])  # lapsed or lost by Redis, and nobody took it: take it again
        if self.sessions.get(session.session_id) is session and session.lease != lease:
            return await self.writer.notice(session.session_id, session.lease, payload, tag, ack_id)
        self._drop(session, "fenced: the lease is no longer this worker's")
        return False

    async def renew_leases(self, sessions: list[VerifierSession] | None = None) -> None:
        raise NotImplementedError  # verifier_worker.leases

    async def _reject(self, session: VerifierSession, entry_id: str, exc: WireError, fatal: bool = False,
                      committed: int = 0) -> None:
        """A draft-stream message that cannot be accepted: a typed error to its edge, the entry acked."""
        self._count_error(exc.code)
        log.warning("message.rejected", session_id=session.session_id, code=exc.code.value, error=exc.message,
                    entry_id=entry_id, fatal=fatal)
        await self._notify(session, ErrorMessage(session.session_id, exc.code, exc.message, fatal=fatal,
                                                 seq=session.next_seq, committed=committed), entry_id)

    def _drop(self, session: VerifierSession, reason: str) -> None:
        """Forget a session this worker may no longer write (its lease went to another worker)."""
        if self.sessions.get(session.session_id) is session:
            del self.sessions[session.session_id]
            self.metrics.session_finished(session.tenant, "lost")
            self.stats.sessions_lost += 1
            self.stats.fenced += reason.startswith("fenced")
            log.warning("session.lost", session_id=session.session_id, reason=reason)
        session.kv.clear()

    async def _finish(self, session: VerifierSession, reason: str) -> None:
        if self.sessions.pop(session.session_id, None) is not None:
            self.metrics.session_finished(session.tenant, reason)
        session.kv.clear()
        self.stats.sessions_finished += 1
        fenced = not await self.writer.finish(session.session_id, session.lease,
                                              self.settings.pool.finished_ttl_s, reason)
        if not fenced:
            await self.pool.forget(session.session_id)
            if self._session_limit(session.tenant):
                await self.pool.leave_session(session.tenant, session.session_id)
        log.info("session.summary", session_id=session.session_id, tenant=session.tenant,
                 reason=reason, rounds=session.rounds, generated=session.generated,
                 drafted=session.drafted, accepted=session.accepted, fenced=fenced,
                 acceptance_rate=round(session.accepted / session.drafted, 4) if session.drafted else None,
                 seconds=round(time.monotonic() - session.opened_at, 3))
