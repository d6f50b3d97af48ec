"""Session admission: tenants' open streams, compatibility, tenant limits, load spreading, KV room.

The tenant of an open is the tenant whose stream it was read from, never the message's claim:
an open whose session id or ``tenant`` field names another tenant is refused (the former
silently, as its id lies in another tenant's key space, which its sender cannot read anyway).
Consumed opens are acknowledged and deleted; an open that waits for KV room goes back to the
end of its tenant's stream, and when that stream already holds ``pool.max_queued_opens`` opens
it is refused with ``busy`` instead: one tenant's flood fills only its own queue.
"""

from __future__ import annotations

import time

from broker.pool import now_ms
from broker.streams import DEFAULT_TENANT, Entry, mac_ok, tenant_of
from common import tracing
from common.wire import ErrorCode, SessionOpen, WireError, decode, peek_session_id
from verifier_worker.capacity import plan_admission, should_pass_on
from verifier_worker.core import WorkerCore, log
from verifier_worker.prompt_check import check_prompt_fits
from verifier_worker.session import VerifierSession, kv_reserve


class AdmissionMixin(WorkerCore):
    # ------------------------------------------------------------------ tenants' open streams

    def configured_tenants(self) -> set[str]:
        tenants = self.settings.tenants
        return {DEFAULT_TENANT, *tenants.names, *tenants.overrides}

    async def _refresh_tenants(self, force: bool = False) -> None:
        """Serve every configured tenant, and those whose open stream a SCAN finds (every few s)."""
        now = time.monotonic()
        if not force and now < self._next_tenant_scan:
            return
        self._next_tenant_scan = now + self.settings.pool.tenant_scan_ms / 1000
        tenants = self.configured_tenants()
        if self.settings.pool.tenant_scan_ms:
            tenants |= await self.broker.discover_tenants()
        for tenant in sorted(tenants):
            stream = self.broker.keys.opens(tenant)
            if stream not in self.tenant_streams:
                await self.broker.ensure_group(stream)
                self.tenant_streams[stream] = tenant
                log.info("tenant.serving", tenant=tenant, stream=stream)

    async def _claim_stuck_opens(self) -> None:
        """Opens a dead worker read but never acknowledged."""
        idle = 2 * self.settings.pool.lease_ms
        for stream, tenant in list(self.tenant_streams.items()):
            for entry in await self.broker.claim_idle(self.worker_id, stream, idle):
                await self._on_open(entry, tenant)

    # ------------------------------------------------------------------ one open

    async def _on_open(self, entry: Entry, tenant: str) -> None:
        raw, key = entry.payload or b"", b""
        try:
            message = decode(raw, self.limits)
            if not isinstance(message, SessionOpen):
                raise WireError(ErrorCode.MALFORMED, "expected a session open message")
            key = self._key_of(message.session_id, message.nonce)
            if tenant_of(message.session_id) != tenant:
                log.warning("open.foreign_session", session_id=message.session_id, tenant=tenant)
                await self.broker.ack(entry.stream, entry.entry_id)  # another tenant's id: no reply
                return
            if message.tenant != tenant:
                raise WireError(ErrorCode.MALFORMED, f"the open claims tenant {message.tenant!r} on the open "
                                f"stream of tenant {tenant!r}", message.session_id)
            if not mac_ok(key, raw, entry.mac):
                raise WireError(ErrorCode.INTEGRITY, "the open's MAC does not verify: edges and verifiers "
                                "need the same redis.verdict_secret", message.session_id)
            self._check_compatible(message)
            if message.session_id in self.sessions or await self.broker.session_known(message.session_id):
                # A duplicated open (an edge re-sends its open while no verdict came): the session
                # is served already, here or elsewhere; refusing it now would end a live session.
                await self.broker.ack(entry.stream, entry.entry_id)
                return
        except WireError as exc:
            sid = exc.session_id or peek_session_id(raw)
            if sid is not None and (tenant_of(sid) != tenant or sid in self.sessions):
                sid = None  # another tenant's id, or a bad open naming a live session: no reply
            await self._reject_open(sid, entry, exc, key)
            return
        if await self._defer_open(entry, message, key):
            return
        if not await self._admit_tenant_session(entry, message, key):
            return
        await self._take(entry, message, raw, key)

    async def _take(self, entry: Entry, message: SessionOpen, raw: bytes, key: bytes) -> None:
        sid = message.session_id
        lease = await self.pool.acquire(sid, self.worker_id, self.settings.pool.lease_ms)
        if lease is not None:
            tag = entry.mac or b""
            await self.pool.save_open(sid, raw, tag)
            await self.broker.ensure_group(self.broker.keys.drafts(sid))
            session = VerifierSession.from_open(message, self.limits.max_gamma)
            session.lease, session.key, session.open_raw, session.open_tag = lease, key, raw, tag
            self._hold(session)
            self.stats.sessions_opened += 1
            self.metrics.admission_outcome("admitted")
            log.info("session.opened", session_id=sid, tenant=message.tenant,
                     **tracing.log_ids(message.trace), prompt_tokens=int(message.prompt_ids.size),
                     max_new_tokens=message.sampling.max_new_tokens,
                     temperature=message.sampling.temperature, hops=entry.hops, lease=lease)
        else:
            log.info("session.open_ignored", session_id=sid,
                     reason="another worker holds its lease, or it finished")
        await self.broker.ack(entry.stream, entry.entry_id)

    def _check_compatible(self, message: SessionOpen) -> None:
        check_prompt_fits(message, self.max_context)
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

    # ------------------------------------------------------------------ tenant limits

    async def _admit_tenant_session(self, entry: Entry, message: SessionOpen, key: bytes) -> bool:
        """Count the session against its tenant's pool-wide limit (atomic in Redis); refuse if over."""
        limit = self._session_limit(message.tenant)
        if not limit:
            return True
        admitted, count = await self.pool.admit_session(message.tenant, message.session_id, limit,
                                                        self._tenant_entry_ms)
        if not admitted:
            await self._reject_open(message.session_id, entry, WireError(
                ErrorCode.TENANT_LIMIT, f"tenant {message.tenant!r} has {count} sessions in the pool, "
                f"its limit is {limit}", message.session_id), key)
        return admitted

    @property
    def _tenant_entry_ms(self) -> int:
        """Lifetime of a session's entry in its tenant's set, renewed with the lease.

        It outlives a lapsed lease by one more lease and a scan, so that a dead worker's sessions
        still count until a peer adopts them (adoption renews the entry, it never refuses).
        """
        return 2 * self.settings.pool.lease_ms + self.settings.pool.scan_interval_ms

    async def _refresh_tenant_sessions(self) -> None:
        """Renew the tenant-set entries of the sessions this worker still owns."""
        held: dict[str, list[str]] = {}
        for session in list(self.sessions.values()):
            if self._session_limit(session.tenant):
                held.setdefault(session.tenant, []).append(session.session_id)
        for tenant, sids in held.items():
            await self.pool.refresh_sessions(tenant, sids, self._tenant_entry_ms)

    # ------------------------------------------------------------------ spreading and KV room

    async def _defer_open(self, entry: Entry, message: SessionOpen, key: bytes) -> bool:
        """Pass the open to a less loaded peer, or let it wait for KV room; True if not taken."""
        cfg = self.settings.pool
        since = entry.since_ms or now_ms()
        if should_pass_on(len(self.sessions), self.peers, entry.hops, cfg.max_open_hops, cfg.spread_slack):
            self.stats.opens_passed_on += 1
            self.metrics.admission_outcome("passed_on")
            await self.pool.pass_on_open(entry, entry.hops + 1, since)
            return True
        need = kv_reserve(int(message.prompt_ids.size), 0, self.limits.max_gamma)  # paged: by use
        victims = plan_admission(list(self.sessions.values()), need, self.engine.arena.admission_budget,
                                 time.monotonic(), cfg.idle_evict_s)
        if victims is not None:
            for victim in victims:
                self._evict(victim)
            return False
        if need > cfg.kv_budget_tokens or now_ms() - since > cfg.admission_wait_s * 1000:
            self.metrics.admission_outcome("refused_capacity")
            await self._reject_open(message.session_id, entry, WireError(
                ErrorCode.CAPACITY, f"no KV room for {need} tokens (budget {cfg.kv_budget_tokens} tokens "
                f"per verifier) within {cfg.admission_wait_s}s"), key)
            return True
        queued = await self.pool.queued_opens(entry.stream)
        if queued > cfg.max_queued_opens:
            self.metrics.admission_outcome("refused_busy")
            await self._reject_open(message.session_id, entry, WireError(
                ErrorCode.BUSY, f"tenant {message.tenant!r} has {queued} session opens waiting (limit "
                f"{cfg.max_queued_opens}): open again later"), key)
            return True
        self.metrics.admission_outcome("deferred")
        await self.pool.pass_on_open(entry, entry.hops, since)  # waits in the stream
        self._opens_paused_until = time.monotonic() + cfg.scan_interval_ms / 1000
        return True

    def _evict(self, session: VerifierSession) -> None:
        session.kv.clear()
        session.evicted = True
        self.stats.evictions += 1
        log.info("session.evicted", session_id=session.session_id, reserve=session.reserve)
