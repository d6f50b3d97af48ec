"""Leases and failover: renewal, adoption of lapsed sessions, stuck and stray messages, expiry.

A background tick renews every held lease (one script per session) and publishes the worker's
load; a lease found held by another worker, or re-taken under a newer epoch, drops the session
here. A lease that vanished while nobody else took it (Redis restarted and lost it) is taken
again under a new epoch, and the session's next commit rewrites its context and meta from this
worker's memory, so sessions survive a Redis that lost its last writes. Every scan interval the
worker adopts sessions whose lease lapsed, rebuilding them from ``{sid}:tokens`` and the state
hash, and claims their pending drafts. Nothing read back is trusted unless its MAC verifies under
the session's key (common.integrity): the open in ``{sid}:meta`` (else the session is not adopted),
and the committed context, vouched for by the last verdict (else it restarts from the prompt).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from broker.streams import SESSION_DATA_ERRORS, Entry, mac_ok
from common.wire import ErrorCode, SessionOpen, Verdict, WireError, decode
from verifier_worker.admission import Admission
from verifier_worker.capacity import should_pass_on
from verifier_worker.core import SessionWrites, WorkerState, log
from verifier_worker.session import VerifierSession


class Leases:
    """Renews the leases of the sessions held, and their entries in their tenants' sets."""

    def __init__(self, state: WorkerState) -> None:
        self.state = state
        # One renewal at a time: after a pause (SIGSTOP, a long GC) the tick's renewal and a fenced
        # commit's ran at once; one took the lapsed lease again, the other found it held (by this
        # very worker, under the new epoch) and dropped the session as lost to another worker.
        self._renewing = asyncio.Lock()

    @property
    def tick_s(self) -> float:
        """Lease renewal and load publishing period: a third of the shorter lifetime."""
        settings = self.state.settings
        return min(settings.verifier.heartbeat_ttl_s, settings.pool.lease_ms / 1000) / 3

    async def tick(self, load: dict[str, Any]) -> None:
        """Renew leases (dropping sessions another worker took), publish load, read peers' loads."""
        state = self.state
        await self.renew()
        await self.refresh_tenant_sessions()
        await state.pool.publish_load(state.worker_id, load)
        fresh = 3 * self.tick_s + 1
        loads = await state.pool.loads(fresh_s=fresh, prune_s=max(60.0, 10 * fresh))
        state.peers = {w: v for w, v in loads.items() if w != state.worker_id}
        await state.broker.heartbeat("verifier", state.worker_id, state.settings.verifier.heartbeat_ttl_s,
                                     json.dumps(load).encode())

    async def renew(self, sessions: list[VerifierSession] | None = None) -> None:
        """Renew (or take again) the leases of ``sessions`` (all held ones by default), one renewal at
        a time: a renewal that waited reads the lease values the one before it left."""
        state = self.state
        async with self._renewing:
            held = {s.session_id: s.lease for s in (sessions or list(state.sessions.values()))
                    if state.holds(s)}
            changes = await state.pool.renew(state.worker_id, held, state.settings.pool.lease_ms)
            for sid, value in changes.items():
                session = state.sessions.get(sid)
                if session is None or session.lease != held[sid]:
                    continue  # finished meanwhile
                if value is None:
                    state.drop(session, "lease held by another worker")
                    continue
                await self._retaken(session, value)

    async def _retaken(self, session: VerifierSession, lease: str) -> None:
        """The lease vanished and this worker took it again: rewrite what Redis may have lost."""
        state = self.state
        session.lease, session.repair = lease, True
        state.stats.leases_retaken += 1
        await state.pool.save_open(session.session_id, session.open_raw, session.open_tag)
        await state.broker.ensure_group(state.broker.keys.drafts(session.session_id))
        log.warning("session.lease_retaken", session_id=session.session_id, lease=lease)

    async def refresh_tenant_sessions(self) -> None:
        """Renew the tenant-set entries of the sessions this worker still owns."""
        state = self.state
        held: dict[str, list[str]] = {}
        for session in list(state.sessions.values()):
            if state.session_limit(session.tenant):
                held.setdefault(session.tenant, []).append(session.session_id)
        for tenant, sids in held.items():
            await state.pool.refresh_sessions(tenant, sids, state.tenant_entry_ms)


Dispatch = Callable[[Entry], Awaitable[None]]
"""Handle one read entry as the worker loop does (``VerifierWorker.dispatch``)."""


class Maintenance:
    """Every scan interval: adopt lapsed sessions, reclaim stuck messages, expire abandoned ones."""

    def __init__(self, state: WorkerState, writes: SessionWrites, admission: Admission,
                 dispatch: Dispatch) -> None:
        self.state = state
        self.writes = writes
        self.admission = admission
        self.dispatch = dispatch
        self.next_scan = 0.0
        self.next_janitor = 0.0
        self.janitor_cursor = 0

    async def maintain(self) -> None:
        state, now = self.state, time.monotonic()
        if now < self.next_scan:
            return
        self.next_scan = now + state.settings.pool.scan_interval_ms / 1000
        await self.admission.refresh_tenants()
        if state.accepting:
            await self._adopt_lapsed()
            await self.admission.claim_stuck_opens()
        await self._claim_stray_drafts(now)
        await self._expire_abandoned(now)
        await self._janitor(now)

    async def _adopt_lapsed(self) -> None:
        state = self.state
        cfg = state.settings.pool
        for sid in await state.pool.lapsed():
            if sid in state.sessions:
                continue
            if should_pass_on(len(state.sessions), state.peers, 0, 1, cfg.spread_slack):
                return  # clearly more loaded than a live peer: leave the rest to it
            try:
                lease = await state.pool.acquire(sid, state.worker_id, cfg.lease_ms)
                if lease is not None:
                    await self._adopt(sid, lease)
            except SESSION_DATA_ERRORS as exc:  # its keys hold what no verifier wrote: it ends here
                state.sessions.pop(sid, None)
                await self.writes.session_data_failed(sid, exc, await self._adoptee_key(sid))

    async def _adoptee_key(self, sid: str) -> bytes:
        """The verdict key of a session from its saved open (empty when that is unreadable)."""
        try:
            raw, _ = await self.state.pool.load_open(sid)
            return self.admission.open_key(raw or b"")
        except SESSION_DATA_ERRORS:
            return b""

    async def _trusted_open(self, sid: str) -> tuple[SessionOpen, bytes, bytes, bytes] | None:
        """The session's saved open (decoded, raw), its MAC and the session's key, if the MAC verifies."""
        state = self.state
        raw, tag = await state.pool.load_open(sid)
        try:
            message = decode(raw or b"", state.limits)
        except WireError:
            return None
        if not isinstance(message, SessionOpen) or message.session_id != sid:
            return None
        key = state.key_of(sid, message.nonce)
        if not mac_ok(key, raw or b"", tag):
            state.count_error(ErrorCode.INTEGRITY)
            log.warning("session.open_unauthenticated", session_id=sid,
                        error="the saved open's MAC does not verify: not adopted")
            return None
        return message, raw or b"", tag or b"", key

    async def _adopt(self, sid: str, lease: str) -> None:
        """Rebuild a session from its open message and committed tokens, then claim its drafts."""
        state = self.state
        opened = await self._trusted_open(sid)
        stored = await state.broker.load_state(sid)
        if opened is None or _finished(stored):
            await state.pool.release({sid: lease})
            await state.pool.forget(sid)  # finished or expired meanwhile: nothing to adopt
            return
        message, raw, tag, key = opened
        longest = message.prompt_ids.size + message.sampling.max_new_tokens + state.limits.max_gamma + 1
        tokens = await state.broker.load_tokens(sid, max_bytes=4 * int(longest))
        session = VerifierSession.restore(message, stored, tokens, key, state.limits.max_gamma)
        session.adopted_idle = True  # until its first draft (RDB: a finished session may come back)
        if tokens and not session.stored:
            state.count_error(ErrorCode.INTEGRITY)
            log.warning("session.state_untrusted", session_id=sid, error="the committed context in Redis is "
                        "not vouched for by a verdict under the session's key: restarting from the prompt")
        session.lease, session.open_raw, session.open_tag = lease, raw, tag
        await state.broker.ensure_group(state.broker.keys.drafts(sid))
        if state.session_limit(session.tenant):  # admitted once: count it, never refuse it
            await state.pool.admit_session(session.tenant, sid, 0, state.tenant_entry_ms)
        state.hold(session)
        state.stats.sessions_adopted += 1
        log.info("session.adopted", session_id=sid, tenant=session.tenant, context=len(session.context),
                 next_seq=session.next_seq, lease=lease)
        await self._claim_pending(session, min_idle_ms=0)

    async def _claim_pending(self, session: VerifierSession, min_idle_ms: int) -> None:
        """Take over the session's drafts pending at other consumers; dead-letter repeat failures."""
        state = self.state
        stream = state.broker.keys.drafts(session.session_id)
        entries = await state.broker.claim_idle(state.worker_id, stream, min_idle_ms)
        counts = await state.pool.delivery_counts(stream, [e.entry_id for e in entries])
        for entry in entries:
            deliveries = counts.get(entry.entry_id, 1)
            if deliveries > state.settings.pool.max_deliveries:
                error = (f"delivered {deliveries} times without a verdict (verifiers failed or died "
                         "while verifying it)")
                await self.writes.dead_letter(session, entry, error, deliveries)
                return
            await self.dispatch(entry)

    async def _claim_stray_drafts(self, now: float) -> None:
        """Drafts a former owner read after it lost the lease stay pending at it: claim them."""
        lease_ms = self.state.settings.pool.lease_ms
        lease_s = lease_ms / 1000
        for session in list(self.state.sessions.values()):
            if not session.queue and lease_s <= now - session.last_active <= 4 * lease_s:
                try:
                    await self._claim_pending(session, min_idle_ms=lease_ms)
                except SESSION_DATA_ERRORS as exc:
                    await self.writes.session_data_failed(session.session_id, exc, session.key, session)

    async def _expire_abandoned(self, now: float) -> None:
        settings = self.state.settings
        ttl, adopted = settings.redis.session_ttl_s, settings.pool.adopted_idle_s
        for session in list(self.state.sessions.values()):
            # Its edge is gone (no draft for the session TTL, or none since adoption): free its KV
            # memory and tenant slot. A live edge re-sends its draft within its resend budget.
            idle = adopted if adopted and session.adopted_idle else ttl
            if not session.queue and now - session.last_active > idle:
                log.warning("session.expired", session_id=session.session_id, tenant=session.tenant,
                            idle_s=idle, adopted=session.adopted_idle)
                await self.writes.finish(session, "expired")

    async def _janitor(self, now: float) -> None:
        """A bounded SCAN step giving session-pattern keys without a TTL the session TTL."""
        state = self.state
        every = state.settings.pool.janitor_interval_s
        if not every or now < self.next_janitor or state.broker.cluster:
            return
        self.next_janitor = now + every
        pattern = f"{state.broker.keys.prefix}:{{*"
        try:
            cursor = self.janitor_cursor
            self.janitor_cursor = await state.pool.expire_untimed(pattern, state.broker.ttl, cursor)
        except SESSION_DATA_ERRORS as exc:  # e.g. SCAN refused by a narrower ACL: skip it
            log.warning("janitor.failed", error=str(exc)[:300])


def _finished(state: dict[bytes, bytes]) -> bool:
    """Whether the session ended: its tombstone, or a last verdict that ended it (owner died)."""
    if state.get(b"finished"):
        return True
    raw = state.get(b"last_verdict")
    if not raw:
        return False
    try:
        message = decode(raw)
    except WireError:
        return False
    return isinstance(message, Verdict) and message.finish_reason is not None
