"""The verifier worker: its loop and lifecycle. Own sessions by lease, gather drafts, verify, commit.

Each iteration reads, in one XREADGROUP, the open streams of the tenants it serves and the draft
streams of every session this worker owns; then it verifies the ready drafts (chosen fairly
across tenants within ``max_batch_sessions`` and ``max_batch_tokens``) in a single target forward
pass, commits every round (one fenced script per session), and loops. Sessions join and leave
between iterations. The parts (docs/pool.md):

    verifier_worker/admission.py   session opens: tenants' streams, limits, spreading, KV room
    verifier_worker/leases.py      lease renewal, adoption and failover, stuck and stray messages
    verifier_worker/rounds.py      idempotent draft queueing, batch choice, verification, commits
    verifier_worker/core.py        what they share: settings, brokers, sessions, fenced notices
    verifier_worker/aclcheck.py    the start-up check that this worker's Redis ACL is not too wide
"""

from __future__ import annotations

import asyncio
import time

from broker.streams import TRANSIENT_ERRORS, Entry, mac_ok, with_backoff
from common.integrity import NO_SECRET_RISK
from common.logs import bind
from common.wire import DraftBatch, ErrorCode, ErrorMessage, SessionClose, WireError, decode
from verifier_worker.aclcheck import check_acl
from verifier_worker.core import VerifierStats, default_worker_id, log
from verifier_worker.rounds import RoundMixin
from verifier_worker.session import VerifierSession

__all__ = ["VerifierStats", "VerifierWorker", "default_worker_id"]

FORGED_RETELL_S = 1.0  # a flood of forged drafts costs the edge at most one notice a second


class VerifierWorker(RoundMixin):
    @property
    def _read_count(self) -> int:
        """Draft entries per stream per read."""
        return max(8, self.settings.verifier.max_batch_sessions)

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, drain for up to drain_timeout_s, then hand sessions over."""
        bind(worker_id=self.worker_id)
        self.stopping = stop
        await self.startup()
        ticker = asyncio.create_task(self._tick_loop())
        try:
            await self._serve(stop)
            self.accepting = False
            deadline = time.monotonic() + self.settings.verifier.drain_timeout_s
            log.info("verifier.draining", sessions=len(self.sessions))
            while self.sessions and time.monotonic() < deadline:
                try:
                    await self.iterate()
                except TRANSIENT_ERRORS as exc:  # Redis is gone: peers adopt from what persisted
                    log.warning("verifier.drain_stopped", error=str(exc))
                    break
        finally:
            ticker.cancel()
            await self.shutdown()

    async def startup(self) -> None:
        await check_acl(self.broker, self.settings.verifier.acl_check)
        if not self.settings.redis.verdict_secret:
            log.warning("verifier.no_verdict_secret", risk=NO_SECRET_RISK)
        await with_backoff(lambda: self._refresh_tenants(force=True), "serve_tenants", self.stopping)
        await self.tick()
        # Session opens this consumer read before a restart but never acknowledged.
        for stream, tenant in list(self.tenant_streams.items()):
            for entry in await self.broker.read_pending(self.worker_id, stream):
                await self._on_open(entry, tenant)
        arena = self.engine.arena
        log.info("verifier.started", model=self.model_name, vocab=self.engine.vocab_size,
                 peers=sorted(self.peers), kv_budget_tokens=arena.budget_tokens,
                 tenants=sorted(self.tenant_streams.values()),
                 kv_arena_mib=round(arena.budget_tokens * arena.bytes_per_token / 2**20, 1))

    async def shutdown(self) -> None:
        """Release leases at once (peers adopt the sessions now, not after a lapse)."""
        log.info("verifier.stopped", unfinished_sessions=len(self.sessions),
                 forward_passes=self.engine.forward_passes, rounds=self.stats.rounds,
                 max_sessions_held=self.stats.max_sessions_held, adopted=self.stats.sessions_adopted,
                 duplicates=self.stats.duplicates, fenced=self.stats.fenced, repairs=self.stats.repairs,
                 leases_retaken=self.stats.leases_retaken)
        try:
            await self.pool.release({sid: s.lease for sid, s in self.sessions.items()})
            await self.pool.remove_worker(self.worker_id)
            await self.broker.clear_heartbeat("verifier", self.worker_id)
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
        await self._maintain()
        ready = self._has_runnable_draft()
        block = None if ready else self._idle_block_ms()
        reading_opens = self.accepting and time.monotonic() >= self._opens_paused_until
        opens = list(self.tenant_streams) if reading_opens else []
        drafts = [self.broker.keys.drafts(sid) for sid in self.sessions]
        if opens or drafts:
            for entry in await self._read(opens, drafts, block):
                await self._dispatch(entry)
        elif not ready:
            await asyncio.sleep(self._idle_block_ms() / 1000)
        await self._verify_ready()

    async def _read(self, opens: list[str], drafts: list[str], block: int | None) -> list[Entry]:
        """Opens (at most ``pool.opens_per_read`` per tenant) and drafts: two reads, never one per session.

        Opens are read apart, without blocking while drafts are read, so that a tenant flooding
        its open stream costs each iteration a bounded number of opens, not a whole read's worth.
        """
        per_tenant = self.settings.pool.opens_per_read
        entries: list[Entry] = []
        if opens:
            opens_block = None if drafts else block
            entries += await with_backoff(lambda: self.broker.read_work(
                self.worker_id, opens, opens_block, count=per_tenant), "read_opens", self.stopping)
        if drafts:
            count = self._read_count
            entries += await with_backoff(lambda: self.broker.read_work(
                self.worker_id, drafts, block, count=count), "read_drafts", self.stopping)
        return entries

    def _has_runnable_draft(self) -> bool:
        """A queued draft that may be verified now (not held back for its tenant's rate)."""
        now = time.monotonic()
        return any(s.queue and not (self.throttle.held(s.tenant, now) and not self.throttle.is_paid(s))
                   for s in self.sessions.values())

    def _idle_block_ms(self) -> int:
        """How long a read may block: the idle block, or less when a held tenant's wait ends first."""
        block = self.settings.verifier.idle_block_ms
        release = self.throttle.next_release(time.monotonic())
        return block if release is None else max(1, min(block, int(release * 1000) + 1))

    async def _dispatch(self, entry: Entry) -> None:
        tenant = self.tenant_streams.get(entry.stream)
        if tenant is not None:
            await self._on_open(entry, tenant)
            return
        session = self.sessions.get(self.broker.keys.session_of(entry.stream))
        if session is None:
            # The session ended, or another worker owns it now: leave the entry pending (the
            # owner claims stale pending drafts; a deleted stream takes its pending list along).
            return
        if not mac_ok(session.key, entry.payload or b"", entry.mac):
            await self._forged_draft(session, entry)  # not from this session's edge: never decoded
            return
        try:
            message = decode(entry.payload or b"", self.limits)
            if isinstance(message, SessionClose):
                await self.broker.ack(entry.stream, entry.entry_id)
                await self._finish(session, message.reason)
            elif isinstance(message, DraftBatch):
                await self._on_draft(session, entry.entry_id, message)
            else:
                raise WireError(ErrorCode.MALFORMED, f"unexpected {message.type_} on a draft stream")
        except WireError as exc:
            await self._reject(session, entry.entry_id, exc)

    async def _forged_draft(self, session: VerifierSession, entry: Entry) -> None:
        """Drop a draft-stream entry whose MAC does not verify; tell the edge (at most once a second)."""
        session.forged += 1
        self.stats.forged_drafts += 1
        self._count_error(ErrorCode.INTEGRITY)
        log.warning("draft.unauthenticated", session_id=session.session_id, entry_id=entry.entry_id,
                    forged=session.forged)
        now = time.monotonic()
        if now - session.forged_told < FORGED_RETELL_S:
            await self.writer.ack_foreign(entry.stream, entry.entry_id)
            return
        session.forged_told = now
        await self._notify(session, ErrorMessage(
            session.session_id, ErrorCode.INTEGRITY, f"{session.forged} message(s) in this session's draft "
            "stream failed authentication (not written by its edge): dropped, not verified",
            seq=session.next_seq, fatal=False), entry.entry_id)
