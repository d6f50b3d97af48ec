"""Session admission: tenants' open streams, compatibility, tenant limits, load spreading, KV room.

The tenant of an open is the tenant whose stream it was read from, never the message's claim:
an open whose session id or ``tenant`` field names another tenant is refused (the former
silently, as its id lies in another tenant's key space, which its sender cannot read anyway).
Consumed opens are acknowledged and deleted; an open passed on to a peer or waiting for KV room
goes to the tenant's deferred stream, which only verifiers write (a tenant cannot block its ids),
acknowledged only once that write landed. A read's opens are triaged together first
(``capacity.triage_open``): edges write a session's first draft before its open, so an open whose
session has no draft stream is idle (nobody listens) and is dropped unanswered while its tenant
has a backlog or once older than ``pool.open_grace_s``; live opens are served first and never
refused for the length of their tenant's queue. An open that passed triage but is older than
``pool.open_expiry_s`` is refused with ``session_expired``; one without a draft stream read while
its tenant's queue holds more than ``pool.max_queued_opens`` gets ``busy``. Redis replies a
tenant shaped (keys of the wrong type, blocked ids, refusals) fail only the open's session
(``open_guarded``). Whether
an open is taken, passed on, waits or is refused for KV room is one pure decision
(``capacity.decide_admission``); this part reads what it needs and executes the decision.
"""

from __future__ import annotations

import time

from broker.pool import now_ms
from broker.streams import DEFAULT_TENANT, SESSION_DATA_ERRORS, Entry, SessionDataError, mac_ok, tenant_of
from common import tracing
from common.wire import ErrorCode, SessionOpen, WireError, decode, peek_session_id
from verifier_worker.capacity import (
    DROP,
    LIVE,
    AdmissionRules,
    Evict,
    OpenRequest,
    OpenSeen,
    PassOn,
    Reject,
    TriageRules,
    Wait,
    decide_admission,
    triage_open,
)
from verifier_worker.core import SessionWrites, WorkerState, log
from verifier_worker.prompt_check import check_prompt_fits
from verifier_worker.session import VerifierSession, kv_reserve

PLAUSIBLE_ID_AGE_MS = 86_400_000
DRAIN_READS = 8  # extra reads per iteration of a tenant stream whose last read held only idle opens


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


class Admission:
    """Reads tenants' open streams and admits, passes on, defers or refuses each open."""

    def __init__(self, state: WorkerState, writes: SessionWrites) -> None:
        self.state = state
        self.writes = writes
        self.next_tenant_scan = 0.0  # when to look for new tenants' open streams again
        self.opens_paused_until = 0.0  # an open waits for KV room: read no opens until then
        self.queue_lengths: dict[str, tuple[float, int]] = {}  # tenant -> (read at, opens waiting)
        self.backlog_seen: dict[str, tuple[float, int]] = {}  # tenant -> (remembered until, backlog)

    def reading_opens(self, now: float) -> bool:
        """Whether this iteration reads open streams (accepting, and no open waits for KV room)."""
        return self.state.accepting and now >= self.opens_paused_until

    # ------------------------------------------------------------------ tenants' open streams

    def configured_tenants(self) -> set[str]:
        tenants = self.state.settings.tenants
        return {DEFAULT_TENANT, *tenants.names, *tenants.overrides}

    async def refresh_tenants(self, force: bool = False) -> None:
        """Serve every configured tenant, and those whose open stream a SCAN finds (every few s)."""
        state, now = self.state, time.monotonic()
        if not force and now < self.next_tenant_scan:
            return
        self.next_tenant_scan = now + state.settings.pool.tenant_scan_ms / 1000
        tenants = self.configured_tenants()
        if state.settings.pool.tenant_scan_ms:
            tenants |= await state.broker.discover_tenants()
        for tenant in sorted(tenants):
            for stream in (state.broker.keys.opens(tenant), state.broker.keys.deferred(tenant)):
                if stream in state.tenant_streams:
                    continue
                try:
                    await state.broker.ensure_group(stream)
                except SessionDataError as exc:  # its opens key is not a stream (no ACLs): skip it
                    log.error("tenant.stream_invalid", tenant=tenant, stream=stream, error=str(exc))
                    continue
                state.tenant_streams[stream] = tenant
                log.info("tenant.serving", tenant=tenant, stream=stream)

    async def claim_stuck_opens(self) -> None:
        """Opens a dead worker read but never acknowledged."""
        state = self.state
        idle = 2 * state.settings.pool.lease_ms
        for stream in list(state.tenant_streams):
            await self.on_opens(await state.broker.claim_idle(state.worker_id, stream, idle))

    async def read_pending(self) -> None:
        """Session opens this consumer read before a restart but never acknowledged."""
        state = self.state
        for stream in list(state.tenant_streams):
            await self.on_opens(await state.broker.read_pending(state.worker_id, stream))

    # ------------------------------------------------------------------ a read's opens, triaged

    async def on_opens(self, entries: list[Entry], count: int = 0) -> None:
        """A read's opens: triaged together (``capacity.triage_open``: one pipelined check of their
        sessions' draft streams), idle ones dropped in one write, live ones admitted first. A stream
        whose read of ``count`` opens held only idle ones is read again (up to ``DRAIN_READS`` times
        per iteration): a tenant's backlog of idle opens drains at the cost of a read and a check
        per ``count`` opens, and its live sessions behind it are reached in seconds."""
        state = self.state
        for drain in range(DRAIN_READS + 1):
            dropped = await self._triage(entries)
            full = [stream for stream, n in dropped.items() if count and n >= count
                    and stream in state.tenant_streams]
            if not full or drain == DRAIN_READS or state.broker.cluster or not state.accepting:
                return
            try:
                entries = await state.broker.read_work(state.worker_id, full, None, count=count)
            except SESSION_DATA_ERRORS as exc:
                log.error("open.drain_failed", streams=full, error=str(exc)[:300])
                return

    async def _triage(self, entries: list[Entry]) -> dict[str, int]:
        """Triage and serve ``entries``; returns how many were dropped per stream."""
        state = self.state
        tenants = state.tenant_streams
        entries = [e for e in entries if e.stream in tenants]
        if not entries:
            return {}
        keys = state.broker.keys
        sids = [peek_session_id(e.payload or b"") for e in entries]
        sids = [sid if sid is not None and tenant_of(sid) == tenants[e.stream] else None
                for sid, e in zip(sids, entries, strict=True)]
        try:
            drafted = await state.broker.existing([keys.drafts(sid) for sid in sids if sid is not None])
        except SESSION_DATA_ERRORS as exc:  # cannot tell: every open takes the per-open path
            log.error("open.triage_failed", error=str(exc)[:300])
            drafted = {keys.drafts(sid) for sid in sids if sid is not None}
        cfg, now = state.settings.pool, now_ms()
        rules = TriageRules(grace_ms=cfg.open_grace_s * 1000, backlog_at=cfg.opens_per_read)
        live: list[Entry] = []
        unseen: list[Entry] = []
        dropped: dict[str, list[str]] = {}
        for entry, sid in zip(entries, sids, strict=True):
            if sid is None:  # undecodable, or another tenant's id: the per-open path refuses or ignores it
                unseen.append(entry)
                continue
            seen = OpenSeen(age_ms=open_age_ms(entry, now), edge_seen=keys.drafts(sid) in drafted,
                            backlog=await self.recent_backlog(tenants[entry.stream]))
            where = triage_open(seen, rules)
            if where == DROP:
                dropped.setdefault(entry.stream, []).append(entry.entry_id)
            else:
                (live if where == LIVE else unseen).append(entry)
        for stream, ids in dropped.items():
            await self._drop(stream, tenants[stream], ids)
        for entry in live:
            await self.open_guarded(entry, tenants[entry.stream], live=True)
        for entry in unseen:
            await self.open_guarded(entry, tenants[entry.stream])
        return {stream: len(ids) for stream, ids in dropped.items()}

    async def _drop(self, stream: str, tenant: str, ids: list[str]) -> None:
        """Opens nobody drafted for: acknowledged and deleted in one write, no reply (nobody listens)."""
        state = self.state
        try:
            await state.broker.ack(stream, *ids)
        except SESSION_DATA_ERRORS as exc:
            log.error("open.unacked", stream=stream, entries=len(ids), error=str(exc)[:300])
            return
        state.stats.opens_dropped += len(ids)
        state.metrics.admission_outcome("dropped_no_edge", len(ids))
        read_at, waiting = self.queue_lengths.get(tenant, (0.0, 0))
        self.queue_lengths[tenant] = (read_at, max(0, waiting - len(ids)))
        log.info("opens.dropped", tenant=tenant, stream=stream, count=len(ids),
                 reason="no draft from an edge (its tenant has a backlog, or the grace passed)")

    async def backlog(self, tenant: str) -> int:
        """Opens waiting in the tenant's queue (new and deferred), re-read once per scan interval."""
        state, now = self.state, time.monotonic()
        seen = self.queue_lengths.get(tenant)
        if seen is None or now - seen[0] > state.settings.pool.scan_interval_ms / 1000:
            try:
                seen = (now, await state.pool.queued_opens(tenant))
            except SESSION_DATA_ERRORS:
                seen = (now, 0)
            self.queue_lengths[tenant] = seen
        return seen[1]

    async def recent_backlog(self, tenant: str) -> int:
        """The tenant's backlog, or the last one over ``pool.opens_per_read`` seen within
        ``pool.open_grace_s``: a tenant that floods in bursts is treated as flooding between them
        (the tail of each burst is not served as if the queue were quiet)."""
        cfg, now = self.state.settings.pool, time.monotonic()
        waiting = await self.backlog(tenant)
        if waiting > cfg.opens_per_read:
            self.backlog_seen[tenant] = (now + cfg.open_grace_s, waiting)
            return waiting
        until, remembered = self.backlog_seen.get(tenant, (0.0, 0))
        if now >= until:
            self.backlog_seen.pop(tenant, None)
            return waiting
        return max(waiting, remembered)

    async def open_guarded(self, entry: Entry, tenant: str, live: bool = False) -> None:
        """One open, its Redis replies shaped by its tenant (keys of the wrong type, blocked ids,
        refusals) kept to its own session: that session fails typed, the open is acked, all else goes on."""
        state = self.state
        try:
            await self.on_open(entry, tenant, live)
        except SESSION_DATA_ERRORS as exc:
            raw = entry.payload or b""
            sid = peek_session_id(raw)
            if sid is not None and tenant_of(sid) == tenant and sid not in state.sessions:
                await self.writes.session_data_failed(sid, exc, self.open_key(raw))
            else:
                log.error("open.invalid_state", stream=entry.stream, entry_id=entry.entry_id,
                          error=str(exc)[:300])
            try:
                await state.broker.ack(entry.stream, entry.entry_id)
            except SESSION_DATA_ERRORS as again:
                log.error("open.unacked", stream=entry.stream, entry_id=entry.entry_id,
                          error=str(again)[:300])

    def open_key(self, raw: bytes) -> bytes:
        """The verdict key of an open (for a typed error's MAC); empty when it does not decode."""
        try:
            message = decode(raw, self.state.limits)
        except WireError:
            return b""
        if not isinstance(message, SessionOpen):
            return b""
        return self.state.key_of(message.session_id, message.nonce)

    # ------------------------------------------------------------------ one open

    async def on_open(self, entry: Entry, tenant: str, live: bool = False) -> None:
        """One open; ``live``: its edge has drafted (triage saw its draft stream), so its tenant's
        queue length never refuses it: a backlog of idle opens must not fail a live session."""
        state = self.state
        raw, key = entry.payload or b"", b""
        try:
            message = decode(raw, state.limits)
            if not isinstance(message, SessionOpen):
                raise WireError(ErrorCode.MALFORMED, "expected a session open message")
            key = state.key_of(message.session_id, message.nonce)
            if tenant_of(message.session_id) != tenant:
                log.warning("open.foreign_session", session_id=message.session_id, tenant=tenant)
                await state.broker.ack(entry.stream, entry.entry_id)  # another tenant's id: no reply
                return
            if message.tenant != tenant:
                raise WireError(ErrorCode.MALFORMED, f"the open claims tenant {message.tenant!r} on the open "
                                f"stream of tenant {tenant!r}", message.session_id)
            if not mac_ok(key, raw, entry.mac):
                raise WireError(ErrorCode.INTEGRITY, "the open's MAC does not verify: edges and verifiers "
                                "need the same redis.verdict_secret", message.session_id)
            self.check_compatible(message)
            known = message.session_id in state.sessions
            if known or await state.broker.session_known(message.session_id, typed=True):
                # A duplicated open (an edge re-sends its open while no verdict came): the session
                # is served already, here or elsewhere; refusing it now would end a live session.
                await state.broker.ack(entry.stream, entry.entry_id)
                return
            self._check_fresh(entry, message)
            if not live:
                await self._check_queue(entry, message)
        except WireError as exc:
            await self._refuse_open(entry, tenant, exc, key)
            return
        if await self._defer(entry, message, key):
            return
        if not await self._admit_tenant_session(entry, message, key):
            return
        await self._take(entry, message, raw, key)

    async def _refuse_open(self, entry: Entry, tenant: str, exc: WireError, key: bytes) -> None:
        state = self.state
        if exc.code is ErrorCode.SESSION_EXPIRED and exc.session_id:  # copies re-sent meanwhile: ignored
            await state.pool.condemn(exc.session_id, "expired", state.settings.pool.finished_ttl_s)
        sid = exc.session_id or peek_session_id(entry.payload or b"")
        if sid is not None and (tenant_of(sid) != tenant or sid in state.sessions):
            sid = None  # another tenant's id, or a bad open naming a live session: no reply
        await self.writes.reject_open(sid, entry, exc, key)

    async def _take(self, entry: Entry, message: SessionOpen, raw: bytes, key: bytes) -> None:
        state, sid = self.state, message.session_id
        lease = await state.pool.acquire(sid, state.worker_id, state.settings.pool.lease_ms)
        if lease is not None:
            tag = entry.mac or b""
            await state.pool.save_open(sid, raw, tag)
            await state.broker.ensure_group(state.broker.keys.drafts(sid))
            session = VerifierSession.from_open(message, state.limits.max_gamma)
            session.lease, session.key, session.open_raw, session.open_tag = lease, key, raw, tag
            session.adopted_idle = True  # until its first draft: ended after pool.adopted_idle_s without one
            state.hold(session)
            state.stats.sessions_opened += 1
            state.metrics.admission_outcome("admitted")
            log.info("session.opened", session_id=sid, tenant=message.tenant,
                     **tracing.log_ids(message.trace), prompt_tokens=int(message.prompt_ids.size),
                     max_new_tokens=message.sampling.max_new_tokens,
                     temperature=message.sampling.temperature, hops=entry.hops, lease=lease)
        else:
            log.info("session.open_ignored", session_id=sid,
                     reason="another worker holds its lease, or it finished")
        await state.broker.ack(entry.stream, entry.entry_id)

    def _check_fresh(self, entry: Entry, message: SessionOpen) -> None:
        """An open queued longer than ``pool.open_expiry_s`` is refused, not served late: its edge
        has given up or is about to, and a tenant's backlog must not hold its new sessions back."""
        expiry_s = self.state.settings.pool.open_expiry_s
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
        state = self.state
        waiting = await self.backlog(message.tenant)
        self.queue_lengths[message.tenant] = (self.queue_lengths[message.tenant][0], waiting - 1)  # it leaves
        limit = state.settings.pool.max_queued_opens
        if waiting > limit:
            raise WireError(ErrorCode.BUSY, f"tenant {message.tenant!r} has {waiting} session opens waiting "
                            f"(limit {limit}): open again later", message.session_id)

    def check_compatible(self, message: SessionOpen) -> None:
        state = self.state
        check_prompt_fits(message, state.max_context)
        if message.vocab_fingerprint != state.fingerprint:
            raise WireError(
                ErrorCode.TOKENIZER_MISMATCH,
                f"draft {message.draft_model!r} (vocabulary {message.vocab_fingerprint}) is "
                f"incompatible with target {state.model_name!r} (vocabulary {state.fingerprint})",
                message.session_id,
            )
        if message.target_model and message.target_model != state.model_name:
            raise WireError(ErrorCode.MODEL_MISMATCH,
                            f"session expects target {message.target_model!r}, this pool runs "
                            f"{state.model_name!r}", message.session_id)

    # ------------------------------------------------------------------ tenant limits

    async def _admit_tenant_session(self, entry: Entry, message: SessionOpen, key: bytes) -> bool:
        """Count the session against its tenant's pool-wide limit (atomic in Redis); refuse if over."""
        state = self.state
        limit = state.session_limit(message.tenant)
        if not limit:
            return True
        admitted, count = await state.pool.admit_session(message.tenant, message.session_id, limit,
                                                         state.tenant_entry_ms)
        if not admitted:
            await self.writes.reject_open(message.session_id, entry, WireError(
                ErrorCode.TENANT_LIMIT, f"tenant {message.tenant!r} has {count} sessions in the pool, "
                f"its limit is {limit}", message.session_id), key)
        return admitted

    # ------------------------------------------------------------------ spreading and KV room

    def rules(self) -> AdmissionRules:
        cfg = self.state.settings.pool
        return AdmissionRules(
            budget=self.state.engine.arena.admission_budget, kv_budget_tokens=cfg.kv_budget_tokens,
            idle_evict_s=cfg.idle_evict_s, admission_wait_s=cfg.admission_wait_s,
            max_queued_opens=cfg.max_queued_opens, max_open_hops=cfg.max_open_hops,
            spread_slack=cfg.spread_slack)

    async def _defer(self, entry: Entry, message: SessionOpen, key: bytes) -> bool:
        """Execute the admission decision; True if the open is not taken here (now)."""
        state = self.state
        since = entry.since_ms or now_ms()
        request = OpenRequest(
            tenant=message.tenant, hops=entry.hops, waited_ms=now_ms() - since,
            need=kv_reserve(int(message.prompt_ids.size), 0, state.limits.max_gamma),  # paged: by use
            queued=await state.pool.queued_opens(message.tenant))
        decision = decide_admission(list(state.sessions.values()), request, self.rules(), state.peers,
                                    time.monotonic())
        outcome = _outcome(decision)
        if outcome:
            state.metrics.admission_outcome(outcome)
        if isinstance(decision, PassOn):
            state.stats.opens_passed_on += 1
            await state.pool.pass_on_open(entry, message.tenant, entry.hops + 1, since)
        elif isinstance(decision, Evict):
            for victim in decision.victims:
                self._evict(victim)
        elif isinstance(decision, Reject):
            error = WireError(decision.code, decision.message)
            await self.writes.reject_open(message.session_id, entry, error, key)
        elif isinstance(decision, Wait):
            await state.pool.pass_on_open(entry, message.tenant, entry.hops, since)  # waits, deferred
            self.opens_paused_until = time.monotonic() + state.settings.pool.scan_interval_ms / 1000
        return isinstance(decision, PassOn | Reject | Wait)

    def _evict(self, session: VerifierSession) -> None:
        session.kv.clear()
        session.evicted = True
        self.state.stats.evictions += 1
        log.info("session.evicted", session_id=session.session_id, reserve=session.reserve)


def _outcome(decision: object) -> str:
    """The admission metric's label of a decision that does not take the open here ("": it does)."""
    if isinstance(decision, Reject):
        return "refused_capacity" if decision.code is ErrorCode.CAPACITY else "refused_busy"
    return {PassOn: "passed_on", Wait: "deferred"}.get(type(decision), "")
