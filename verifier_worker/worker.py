"""The verifier worker: its loop and lifecycle. Own sessions by lease, gather drafts, verify, commit.

Each iteration reads, in one XREADGROUP, the open streams of the tenants it serves and the draft
streams of every session this worker owns; then it verifies the ready drafts (chosen fairly
across tenants within ``max_batch_sessions`` and ``max_batch_tokens``) in a single target forward
pass, commits every round (one fenced script per session), and loops. Sessions join and leave
between iterations. The worker is composed of parts, each given what it uses (no inheritance;
docs/architecture.md walks one round through them):

    verifier_worker/core.py        WorkerState (settings, brokers, sessions, stats) and
                                   SessionWrites (fenced notices, typed errors, dead letters, the end)
    verifier_worker/admission.py   Admission: tenants' open streams, limits, spreading, KV room
    verifier_worker/capacity.py    the pure decisions: decide_admission, load figure, spreading
    verifier_worker/leases.py      Leases (renewal) and Maintenance (adoption, stuck/stray, expiry)
    verifier_worker/rounds.py      Rounds: idempotent draft queueing, batch choice, verification, commits
    verifier_worker/aclcheck.py    the start-up check that this worker's Redis ACL is not too wide
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from broker.streams import (
    SESSION_DATA_ERRORS,
    TRANSIENT_ERRORS,
    Broker,
    Entry,
    SessionDataError,
    mac_ok,
    with_backoff,
)
from common.integrity import NO_SECRET_RISK
from common.logs import bind
from common.settings import Settings
from common.wire import DraftBatch, ErrorCode, ErrorMessage, SessionClose, WireError, decode
from verifier_worker.aclcheck import check_acl
from verifier_worker.admission import Admission
from verifier_worker.capacity import resident_tokens, tenant_sessions
from verifier_worker.core import SessionWrites, VerifierStats, WorkerState, default_worker_id, log
from verifier_worker.engine import TargetEngine
from verifier_worker.leases import Leases, Maintenance
from verifier_worker.rounds import Rounds
from verifier_worker.session import VerifierSession

__all__ = ["VerifierStats", "VerifierWorker", "default_worker_id"]

FORGED_RETELL_S = 1.0  # a flood of forged drafts costs the edge at most one notice a second


class VerifierWorker:
    def __init__(self, settings: Settings, engine: TargetEngine, broker: Broker, model_name: str,
                 fingerprint: str, worker_id: str = "") -> None:
        self.state = WorkerState(settings, engine, broker, model_name, fingerprint, worker_id)
        self.leases = Leases(self.state)
        self.writes = SessionWrites(self.state, self.leases.renew)
        self.admission = Admission(self.state, self.writes)
        self.maintenance = Maintenance(self.state, self.writes, self.admission, self.dispatch)
        self.rounds = Rounds(self.state, self.writes, self.leases.renew)

    # What callers and tests read of the worker: its state's public figures.
    settings = property(lambda self: self.state.settings)
    engine = property(lambda self: self.state.engine)
    broker = property(lambda self: self.state.broker)
    pool = property(lambda self: self.state.pool)
    sessions = property(lambda self: self.state.sessions)
    stats = property(lambda self: self.state.stats)
    metrics = property(lambda self: self.state.metrics)
    worker_id = property(lambda self: self.state.worker_id)
    model_name = property(lambda self: self.state.model_name)
    fingerprint = property(lambda self: self.state.fingerprint)

    @property
    def _read_count(self) -> int:
        """Draft entries per stream per read."""
        return max(8, self.state.settings.verifier.max_batch_sessions)

    def load(self) -> dict[str, Any]:
        """The figures this worker publishes for its peers and `specd pool status`."""
        state = self.state
        sessions = list(state.sessions.values())
        return {
            "sessions": len(sessions), "queue": sum(len(s.queue) for s in sessions),
            "resident_tokens": resident_tokens(sessions),
            "kv_budget_tokens": state.settings.pool.kv_budget_tokens,
            "kv_bytes": sum(s.kv.nbytes() for s in sessions), "tenants": tenant_sessions(sessions),
            "load": self.rounds.pool_load, "rounds": state.stats.rounds, "model": state.model_name,
            "accepting": state.accepting, "max_sessions_held": state.stats.max_sessions_held,
            "pid": os.getpid(),
        }

    async def tick(self) -> None:
        await self.leases.tick(self.load())

    async def _tick_loop(self) -> None:
        while True:
            try:
                await self.tick()
                self.state.metrics.redis_reachable(True)
            except Exception as exc:  # noqa: BLE001 - the main loop reports broker trouble
                self.state.metrics.redis_reachable(False)
                log.warning("verifier.tick_failed", error=str(exc))
            await asyncio.sleep(self.leases.tick_s)

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, drain for up to drain_timeout_s, then hand sessions over."""
        state = self.state
        bind(worker_id=state.worker_id)
        state.stopping = stop
        await self.startup()
        ticker = asyncio.create_task(self._tick_loop())
        try:
            await self._serve(stop)
            state.accepting = False
            deadline = time.monotonic() + state.settings.verifier.drain_timeout_s
            log.info("verifier.draining", sessions=len(state.sessions))
            while state.sessions and time.monotonic() < deadline:
                try:
                    await self.iterate()
                except TRANSIENT_ERRORS as exc:  # Redis is gone: peers adopt from what persisted
                    log.warning("verifier.drain_stopped", error=str(exc))
                    break
        finally:
            ticker.cancel()
            await self.shutdown()

    async def startup(self) -> None:
        state = self.state
        await check_acl(state.broker, state.settings.verifier.acl_check)
        if not state.settings.redis.verdict_secret:
            log.warning("verifier.no_verdict_secret", risk=NO_SECRET_RISK)
        await with_backoff(lambda: self.admission.refresh_tenants(force=True), "serve_tenants",
                           state.stopping)
        await self.tick()
        await self.admission.read_pending()
        arena = state.engine.arena
        log.info("verifier.started", model=state.model_name, vocab=state.engine.vocab_size,
                 peers=sorted(state.peers), kv_budget_tokens=arena.budget_tokens,
                 tenants=sorted(set(state.tenant_streams.values())),
                 kv_arena_mib=round(arena.budget_tokens * arena.bytes_per_token / 2**20, 1))

    async def shutdown(self) -> None:
        """Release leases at once (peers adopt the sessions now, not after a lapse)."""
        state, stats = self.state, self.state.stats
        log.info("verifier.stopped", unfinished_sessions=len(state.sessions),
                 forward_passes=state.engine.forward_passes, rounds=stats.rounds,
                 max_sessions_held=stats.max_sessions_held, adopted=stats.sessions_adopted,
                 duplicates=stats.duplicates, fenced=stats.fenced, repairs=stats.repairs,
                 leases_retaken=stats.leases_retaken)
        try:
            await state.pool.release({sid: s.lease for sid, s in state.sessions.items()})
            await state.pool.remove_worker(state.worker_id)
            await state.broker.clear_heartbeat("verifier", state.worker_id)
        except Exception as exc:  # noqa: BLE001 - best effort while stopping
            log.warning("verifier.release_failed", error=str(exc))

    async def _serve(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.iterate()
            except TRANSIENT_ERRORS as exc:  # Redis went away mid-iteration: back off, carry on
                log.warning("verifier.redis_unavailable", error=str(exc))
                await asyncio.sleep(0.5)

    # ------------------------------------------------------------------ one iteration

    async def iterate(self) -> None:
        state = self.state
        await self.maintenance.maintain()
        ready = self.rounds.has_runnable_draft()
        block = None if ready else self.rounds.idle_block_ms()
        opens = list(state.tenant_streams) if self.admission.reading_opens(time.monotonic()) else []
        drafts = [state.broker.keys.drafts(sid) for sid in state.sessions]
        if opens or drafts:
            entries = await self._read(opens, drafts, block)
            tenants = state.tenant_streams
            await self.admission.on_opens([e for e in entries if e.stream in tenants],
                                          state.settings.pool.opens_per_read)
            for entry in entries:
                if entry.stream not in tenants:
                    await self.dispatch(entry)
        elif not ready:
            await asyncio.sleep(self.rounds.idle_block_ms() / 1000)
        await self.rounds.verify_ready()

    def scan_now(self) -> None:
        """Make the next iteration scan the pool, look for tenants and read opens (tests)."""
        self.maintenance.next_scan = self.admission.next_tenant_scan = 0.0
        self.admission.opens_paused_until = 0.0

    async def _read(self, opens: list[str], drafts: list[str], block: int | None) -> list[Entry]:
        """Opens (at most ``pool.opens_per_read`` per tenant) and drafts: two reads, never one per session.

        Opens are read apart, without blocking while drafts are read, so that a tenant flooding
        its open stream costs each iteration a bounded number of opens, not a whole read's worth.
        """
        state = self.state
        per_tenant = state.settings.pool.opens_per_read
        entries: list[Entry] = []
        try:
            if opens:
                opens_block = None if drafts else block
                entries += await with_backoff(lambda: state.broker.read_work(
                    state.worker_id, opens, opens_block, count=per_tenant), "read_opens", state.stopping)
            if drafts:
                count = self._read_count
                entries += await with_backoff(lambda: state.broker.read_work(
                    state.worker_id, drafts, block, count=count), "read_drafts", state.stopping)
        except SessionDataError as exc:  # a key replaced by another type: its owner fails, the rest read next
            await self._unreadable(exc)
        return entries

    async def _unreadable(self, exc: SessionDataError) -> None:
        """Keys a read found of the wrong type: their sessions fail typed, a tenant's stream is left."""
        state = self.state
        log.error("verifier.unreadable_keys", keys=list(exc.keys), error=str(exc)[:300])
        for key in exc.keys:
            tenant = state.tenant_streams.pop(key, None)
            if tenant is not None:
                log.error("tenant.stream_invalid", tenant=tenant, stream=key)
                continue
            session = state.sessions.get(state.broker.keys.session_of(key))
            if session is not None:
                await self.writes.session_data_failed(session.session_id, exc, session.key, session)
        if not exc.keys:
            await asyncio.sleep(self.rounds.idle_block_ms() / 1000)  # nothing to blame: do not spin

    async def dispatch(self, entry: Entry) -> None:
        """Hand one read entry to its part: an open to admission, a draft to the rounds."""
        state = self.state
        tenant = state.tenant_streams.get(entry.stream)
        if tenant is not None:
            await self.admission.open_guarded(entry, tenant)
            return
        session = state.sessions.get(state.broker.keys.session_of(entry.stream))
        if session is None:
            # The session ended, or another worker owns it now: leave the entry pending (the
            # owner claims stale pending drafts; a deleted stream takes its pending list along).
            return
        if not mac_ok(session.key, entry.payload or b"", entry.mac):
            await self._forged_draft(session, entry)  # not from this session's edge: never decoded
            return
        try:
            message = decode(entry.payload or b"", state.limits)
            if message.session_id != session.session_id:
                raise WireError(ErrorCode.MALFORMED, f"a {message.type_} naming session "
                                f"{message.session_id!r} on the draft stream of {session.session_id!r}")
            if isinstance(message, SessionClose):
                await state.broker.ack(entry.stream, entry.entry_id)
                await self.writes.finish(session, message.reason)
            elif isinstance(message, DraftBatch):
                await self.rounds.on_draft(session, entry.entry_id, message)
            else:
                raise WireError(ErrorCode.MALFORMED, f"unexpected {message.type_} on a draft stream")
        except WireError as exc:
            await self.writes.reject(session, entry.entry_id, exc)
        except SESSION_DATA_ERRORS as exc:  # this session's keys only: it fails, the others go on
            await self.writes.session_data_failed(session.session_id, exc, session.key, session)

    async def _forged_draft(self, session: VerifierSession, entry: Entry) -> None:
        """Drop a draft-stream entry whose MAC does not verify; tell the edge (at most once a second)."""
        state = self.state
        session.forged += 1
        state.stats.forged_drafts += 1
        state.count_error(ErrorCode.INTEGRITY)
        log.warning("draft.unauthenticated", session_id=session.session_id, entry_id=entry.entry_id,
                    forged=session.forged)
        now = time.monotonic()
        if now - session.forged_told < FORGED_RETELL_S:
            await state.writer.ack_foreign(entry.stream, entry.entry_id)
            return
        session.forged_told = now
        await self.writes.notify(session, ErrorMessage(
            session.session_id, ErrorCode.INTEGRITY, f"{session.forged} message(s) in this session's draft "
            "stream failed authentication (not written by its edge): dropped, not verified",
            seq=session.next_seq, fatal=False), entry.entry_id)
