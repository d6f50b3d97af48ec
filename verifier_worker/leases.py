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
import os
import time
from typing import Any

from broker.streams import Entry, mac_ok
from common.wire import ErrorCode, ErrorMessage, SessionOpen, Verdict, WireError, decode
from verifier_worker.admission import AdmissionMixin
from verifier_worker.capacity import load_figure, resident_tokens, should_pass_on, tenant_sessions
from verifier_worker.core import log
from verifier_worker.session import VerifierSession


class LeaseMixin(AdmissionMixin):
    @property
    def tick_s(self) -> float:
        """Lease renewal and load publishing period: a third of the shorter lifetime."""
        return min(self.settings.verifier.heartbeat_ttl_s, self.settings.pool.lease_ms / 1000) / 3

    async def _tick_loop(self) -> None:
        while True:
            try:
                await self.tick()
                self.metrics.redis_reachable(True)
            except Exception as exc:  # noqa: BLE001 - the main loop reports broker trouble
                self.metrics.redis_reachable(False)
                log.warning("verifier.tick_failed", error=str(exc))
            await asyncio.sleep(self.tick_s)

    async def tick(self) -> None:
        """Renew leases (dropping sessions another worker took), publish load, read peers' loads."""
        await self.renew_leases()
        await self._refresh_tenant_sessions()
        load = self.load()
        await self.pool.publish_load(self.worker_id, load)
        fresh = 3 * self.tick_s + 1
        loads = await self.pool.loads(fresh_s=fresh, prune_s=max(60.0, 10 * fresh))
        self.peers = {w: v for w, v in loads.items() if w != self.worker_id}
        await self.broker.heartbeat("verifier", self.worker_id, self.settings.verifier.heartbeat_ttl_s,
                                    json.dumps(load).encode())

    async def renew_leases(self, sessions: list[VerifierSession] | None = None) -> None:
        held = {s.session_id: s.lease for s in (sessions or list(self.sessions.values()))}
        changes = await self.pool.renew(self.worker_id, held, self.settings.pool.lease_ms)
        for sid, value in changes.items():
            session = self.sessions.get(sid)
            if session is None or session.lease != held[sid]:
                continue  # finished meanwhile, or changed by a concurrent renewal
            if value is None:
                self._drop(session, "lease held by another worker")
                continue
            await self._retaken(session, value)

    async def _retaken(self, session: VerifierSession, lease: str) -> None:
        """The lease vanished and this worker took it again: rewrite what Redis may have lost."""
        session.lease, session.repair = lease, True
        self.stats.leases_retaken += 1
        await self.pool.save_open(session.session_id, session.open_raw, session.open_tag)
        await self.broker.ensure_group(self.broker.keys.drafts(session.session_id))
        log.warning("session.lease_retaken", session_id=session.session_id, lease=lease)

    def load(self) -> dict[str, Any]:
        sessions = list(self.sessions.values())
        return {
            "sessions": len(sessions), "queue": sum(len(s.queue) for s in sessions),
            "resident_tokens": resident_tokens(sessions),
            "kv_budget_tokens": self.settings.pool.kv_budget_tokens,
            "kv_bytes": sum(s.kv.nbytes() for s in sessions), "tenants": tenant_sessions(sessions),
            "load": self.pool_load, "rounds": self.stats.rounds, "model": self.model_name,
            "accepting": self.accepting, "max_sessions_held": self.stats.max_sessions_held,
            "pid": os.getpid(),
        }

    def _load_figure(self, ready_tokens: int, ready_sessions: int) -> float:
        budget = self.settings.verifier
        return load_figure(ready_tokens, ready_sessions, resident_tokens(self.sessions.values()),
                           budget.max_batch_tokens, budget.max_batch_sessions,
                           self.settings.pool.kv_budget_tokens)

    # ------------------------------------------------------------------ pool maintenance

    async def _maintain(self) -> None:
        """Every scan interval: adopt lapsed sessions, reclaim stuck messages, expire abandoned."""
        now = time.monotonic()
        if now < self._next_scan:
            return
        self._next_scan = now + self.settings.pool.scan_interval_ms / 1000
        await self._refresh_tenants()
        if self.accepting:
            await self._adopt_lapsed()
            await self._claim_stuck_opens()
        await self._claim_stray_drafts(now)
        await self._expire_abandoned(now)

    async def _adopt_lapsed(self) -> None:
        cfg = self.settings.pool
        for sid in await self.pool.lapsed():
            if sid in self.sessions:
                continue
            if should_pass_on(len(self.sessions), self.peers, 0, 1, cfg.spread_slack):
                return  # clearly more loaded than a live peer: leave the rest to it
            lease = await self.pool.acquire(sid, self.worker_id, cfg.lease_ms)
            if lease is not None:
                await self._adopt(sid, lease)

    async def _trusted_open(self, sid: str) -> tuple[SessionOpen, bytes, bytes, bytes] | None:
        """The session's saved open (decoded, raw), its MAC and the session's key, if the MAC verifies."""
        raw, tag = await self.pool.load_open(sid)
        try:
            message = decode(raw or b"", self.limits)
        except WireError:
            return None
        if not isinstance(message, SessionOpen) or message.session_id != sid:
            return None
        key = self._key_of(sid, message.nonce)
        if not mac_ok(key, raw or b"", tag):
            self._count_error(ErrorCode.INTEGRITY)
            log.warning("session.open_unauthenticated", session_id=sid,
                        error="the saved open's MAC does not verify: not adopted")
            return None
        return message, raw or b"", tag or b"", key

    async def _adopt(self, sid: str, lease: str) -> None:
        """Rebuild a session from its open message and committed tokens, then claim its drafts."""
        opened = await self._trusted_open(sid)
        state = await self.broker.load_state(sid)
        if opened is None or _finished(state):
            await self.pool.release({sid: lease})
            await self.pool.forget(sid)  # finished or expired meanwhile: nothing to adopt
            return
        message, raw, tag, key = opened
        tokens = await self.broker.load_tokens(sid)
        session = VerifierSession.restore(message, state, tokens, key, self.limits.max_gamma)
        if tokens and not session.stored:
            self._count_error(ErrorCode.INTEGRITY)
            log.warning("session.state_untrusted", session_id=sid, error="the committed context in Redis is "
                        "not vouched for by a verdict under the session's key: restarting from the prompt")
        session.lease, session.open_raw, session.open_tag = lease, raw, tag
        await self.broker.ensure_group(self.broker.keys.drafts(sid))
        if self._session_limit(session.tenant):  # admitted once: count it, never refuse it
            await self.pool.admit_session(session.tenant, sid, 0, self._tenant_entry_ms)
        self._hold(session)
        self.stats.sessions_adopted += 1
        log.info("session.adopted", session_id=sid, tenant=session.tenant, context=len(session.context),
                 next_seq=session.next_seq, lease=lease)
        await self._claim_pending(session, min_idle_ms=0)

    async def _claim_pending(self, session: VerifierSession, min_idle_ms: int) -> None:
        """Take over the session's drafts pending at other consumers; dead-letter repeat failures."""
        stream = self.broker.keys.drafts(session.session_id)
        entries = await self.broker.claim_idle(self.worker_id, stream, min_idle_ms)
        counts = await self.pool.delivery_counts(stream, [e.entry_id for e in entries])
        for entry in entries:
            deliveries = counts.get(entry.entry_id, 1)
            if deliveries > self.settings.pool.max_deliveries:
                await self._dead_letter(session, entry, f"delivered {deliveries} times without a verdict "
                                        "(verifiers failed or died while verifying it)", deliveries)
                return
            await self._dispatch(entry)

    async def _dead_letter(self, session: VerifierSession, entry: Entry, error: str, deliveries: int) -> None:
        self.stats.dead_letters += 1
        await self.pool.dead_letter(entry, error, deliveries, self.settings.pool.deadletter_maxlen)
        log.error("draft.dead_letter", session_id=session.session_id, entry_id=entry.entry_id, error=error)
        notice = ErrorMessage(session.session_id, ErrorCode.DEAD_LETTER, error, fatal=True)
        if await self._notify(session, notice):
            await self._finish(session, ErrorCode.DEAD_LETTER.value)

    async def _claim_stray_drafts(self, now: float) -> None:
        """Drafts a former owner read after it lost the lease stay pending at it: claim them."""
        lease_s = self.settings.pool.lease_ms / 1000
        for session in list(self.sessions.values()):
            if not session.queue and lease_s <= now - session.last_active <= 4 * lease_s:
                await self._claim_pending(session, min_idle_ms=self.settings.pool.lease_ms)

    async def _expire_abandoned(self, now: float) -> None:
        ttl = self.settings.redis.session_ttl_s
        for session in list(self.sessions.values()):
            if not session.queue and now - session.last_active > ttl:
                # Its edge is gone (no draft for the session TTL): free the KV memory it holds.
                log.warning("session.expired", session_id=session.session_id, tenant=session.tenant,
                            idle_s=ttl)
                await self._finish(session, "expired")


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
