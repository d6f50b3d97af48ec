"""Session admission: tenants' open streams, compatibility, tenant limits, load spreading, KV room.

The tenant of an open is the tenant whose stream it was read from, never the message's claim:
an open whose session id or ``tenant`` field names another tenant is refused (the former
silently, as its id lies in another tenant's key space, which its sender cannot read anyway).
Consumed opens are acknowledged and deleted; an open passed on to a peer or waiting for KV room
goes to the tenant's deferred stream, which only verifiers write (a tenant cannot block its ids),
acknowledged only once that write landed. Opens older than ``pool.open_expiry_s`` are refused
with ``session_expired``, and while a tenant's queue holds more than ``pool.max_queued_opens``
its opens are refused with ``busy`` as they are read: one tenant's flood fills only its own
queue, and drains at the cost of one rejection per open. Redis replies a tenant shaped (keys of
the wrong type, blocked ids, refusals) fail only the open's session (``_open_guarded``).
"""

from __future__ import annotations

import time

from broker.pool import now_ms
from broker.streams import DEFAULT_TENANT, SESSION_DATA_ERRORS, Entry, SessionDataError, mac_ok, tenant_of
from common import tracing
from common.wire import ErrorCode, SessionOpen, WireError, decode, peek_session_id
from verifier_worker.capacity import plan_admission, should_pass_on
from verifier_worker.core import WorkerCore, log
from verifier_worker.prompt_check import check_prompt_fits
from verifier_worker.session import VerifierSession, kv_reserve

PLAUSIBLE_ID_AGE_MS = 86_400_000


def open_age_ms(entry: Entry, now: int) -> int:
    """How long an open has waited: since a verifier first saw it, or since its stream id's time
    (Redis' clock at XADD). An id a tenant chose makes only its own opens look younger or older;
    one more than a day old (or from the future) says nothing: age 0."""
    first = entry.since_ms
    if not first:
        head = entry.entry_id.partition("-")[0]
        first = int(head) if head.isdigit() and len(head) < 16 else now
        if not now - PLAUSIBLE_ID_AGE_MS <= first <= now:
            first = now
    return max(0, now - first)


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
            for stream in (self.broker.keys.opens(tenant), self.broker.keys.deferred(tenant)):
                if stream in self.tenant_streams:
                    continue
                try:
                    await self.broker.ensure_group(stream)
                except SessionDataError as exc:  # its opens key is not a stream (no ACLs): skip it
                    log.error("tenant.stream_invalid", tenant=tenant, stream=stream, error=str(exc))
                    continue
                self.tenant_streams[stream] = tenant
                log.info("tenant.serving", tenant=tenant, stream=stream)

    async def _claim_stuck_opens(self) -> None:
        """Opens a dead worker read but never acknowledged."""
        idle = 2 * self.settings.pool.lease_ms
        for stream, tenant in list(self.tenant_streams.items()):
            for entry in await self.broker.claim_idle(self.worker_id, stream, idle):
                await self._open_guarded(entry, tenant)

    async def _open_guarded(self, entry: Entry, tenant: str) -> None:
        """One open, its Redis replies shaped by its tenant (keys of the wrong type, blocked ids,
        refusals) kept to its own session: that session fails typed, the open is acked, all else goes on."""
        try:
            await self._on_open(entry, tenant)
        except SESSION_DATA_ERRORS as exc:
            raw = entry.payload or b""
            sid = peek_session_id(raw)
            if sid is not None and tenant_of(sid) == tenant and sid not in self.sessions:
                await self._session_data_failed(sid, exc, self._open_key(raw))
            else:
                log.error("open.invalid_state", stream=entry.stream, entry_id=entry.entry_id,
                          error=str(exc)[:300])
            try:
                await self.broker.ack(entry.stream, entry.entry_id)
            except SESSION_DATA_ERRORS as again:
                log.error("open.unacked", stream=entry.stream, entry_id=entry.entry_id,
                          error=str(again)[:300])

    def _open_key(self, raw: bytes) -> bytes:
        """The verdict key of an open (for a typed error's MAC); empty when it does not decode."""
        try:
            message = decode(raw, self.limits)
        except WireError:
            return b""
        return self._key_of(message.session_id, message.nonce) if isinstance(message, SessionOpen) else b""

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
            known = message.session_id in self.sessions
            if known or await self.broker.session_known(message.session_id, typed=True):
                # A duplicated open (an edge re-sends its open while no verdict came): the session
                # is served already, here or elsewhere; refusing it now would end a live session.
                await self.broker.ack(entry.stream, entry.entry_id)
                return
            self._check_fresh(entry, message)
            await self._check_queue(entry, message)
        except WireError as exc:
            await self._refuse_open(entry, tenant, exc, key)
            return
        if await self._defer_open(entry, message, key):
            return
        if not await self._admit_tenant_session(entry, message, key):
            return
        await self._take(entry, message, raw, key)

    async def _refuse_open(self, entry: Entry, tenant: str, exc: WireError, key: bytes) -> None:
        if exc.code is ErrorCode.SESSION_EXPIRED and exc.session_id:  # copies re-sent meanwhile: ignored
            await self.pool.condemn(exc.session_id, "expired", self.settings.pool.finished_ttl_s)
        sid = exc.session_id or peek_session_id(entry.payload or b"")
        if sid is not None and (tenant_of(sid) != tenant or sid in self.sessions):
            sid = None  # another tenant's id, or a bad open naming a live session: no reply
        await self._reject_open(sid, entry, exc, key)

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

    def _check_fresh(self, entry: Entry, message: SessionOpen) -> None:
        """An open queued longer than ``pool.open_expiry_s`` is refused, not served late: its edge
        has given up or is about to, and a tenant's backlog must not hold its new sessions back."""
        expiry_s = self.settings.pool.open_expiry_s
        age_ms = open_age_ms(entry, now_ms())
        if expiry_s and age_ms > expiry_s * 1000:
            raise WireError(ErrorCode.SESSION_EXPIRED, f"the open waited {age_ms / 1000:.1f}s in tenant "
                            f"{message.tenant!r}'s queue (pool.open_expiry_s = {expiry_s}): open again",
                            message.session_id)

    async def _check_queue(self, entry: Entry, message: SessionOpen) -> None:
        """While the tenant's queue (new and deferred opens) is over ``pool.max_queued_opens``, its
        oldest opens are refused with ``busy`` as they are read: a backlog drains at the cost of a
        rejection each, and the tenant's newer sessions reach the head. Lengths are re-read once
        per scan interval per tenant (not per open)."""
        if entry.hops:
            return  # passed on or deferred already: counted when it was first read
        now = time.monotonic()
        seen = self._queue_lengths.get(message.tenant)
        if seen is None or now - seen[0] > self.settings.pool.scan_interval_ms / 1000:
            seen = (now, await self.pool.queued_opens(message.tenant))
        self._queue_lengths[message.tenant] = (seen[0], seen[1] - 1)  # this one leaves the queue
        limit = self.settings.pool.max_queued_opens
        if seen[1] > limit:
            raise WireError(ErrorCode.BUSY, f"tenant {message.tenant!r} has {seen[1]} session opens waiting "
                            f"(limit {limit}): open again later", message.session_id)

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
            await self.pool.pass_on_open(entry, message.tenant, entry.hops + 1, since)
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
        queued = await self.pool.queued_opens(message.tenant)
        if queued > cfg.max_queued_opens:
            self.metrics.admission_outcome("refused_busy")
            await self._reject_open(message.session_id, entry, WireError(
                ErrorCode.BUSY, f"tenant {message.tenant!r} has {queued} session opens waiting (limit "
                f"{cfg.max_queued_opens}): open again later"), key)
            return True
        self.metrics.admission_outcome("deferred")
        await self.pool.pass_on_open(entry, message.tenant, entry.hops, since)  # waits, deferred
        self._opens_paused_until = time.monotonic() + cfg.scan_interval_ms / 1000
        return True

    def _evict(self, session: VerifierSession) -> None:
        session.kv.clear()
        session.evicted = True
        self.stats.evictions += 1
        log.info("session.evicted", session_id=session.session_id, reserve=session.reserve)
