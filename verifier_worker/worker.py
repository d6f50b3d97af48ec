"""The verifier worker: own sessions by lease, gather drafts, verify them in one pass, publish.

Each iteration reads, in one XREADGROUP, the sessions stream and the draft streams of every
session this worker owns; then it verifies the ready drafts (chosen fairly across tenants within
``max_batch_sessions`` and ``max_batch_tokens``) in a single target forward pass, publishes all
verdicts and acks in one transaction, and loops. Sessions join and leave between iterations.

Pool behaviour (docs/pool.md): a session is owned through a lease that a background tick renews
with the worker's published load; every ``scan_interval_ms`` the worker adopts sessions whose
lease lapsed (a dead or leaving peer's), rebuilding them from the state hash written each round
and claiming their pending drafts. New sessions are passed on to less loaded peers, admitted
against a KV budget, and counted against per-tenant limits: a tenant's concurrent sessions are
admitted atomically in Redis, and its drafts over its draft-token rate wait in their queues
(unacknowledged) until the tenant's pool-wide bucket has their tokens, while other tenants'
drafts are verified.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker.pool import PoolBroker, now_ms
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
from verifier_worker.capacity import (
    load_figure,
    plan_admission,
    resident_tokens,
    should_pass_on,
    tenant_sessions,
)
from verifier_worker.engine import TargetEngine, VerifyOutcome
from verifier_worker.scheduler import DrrScheduler
from verifier_worker.session import PendingDraft, VerifierSession, kv_reserve
from verifier_worker.tenants import BURST_S, DraftThrottle

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
    max_sessions_held: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=list)


class VerifierWorker:
    def __init__(self, settings: Settings, engine: TargetEngine, broker: Broker, model_name: str,
                 fingerprint: str, worker_id: str = "") -> None:
        self.settings = settings
        self.engine = engine
        self.broker = broker
        self.pool = PoolBroker(broker)
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
        self.sessions: dict[str, VerifierSession] = {}
        self.stats = VerifierStats()
        self.accepting = True
        self.scheduler = DrrScheduler()
        self.throttle = DraftThrottle()
        self.peers: dict[str, dict[str, Any]] = {}  # live peers' published loads
        self.pool_load = 0.0
        self._next_scan = 0.0
        self._opens_paused_until = 0.0
        self.metrics = VerifierMetrics()
        self.metrics.track(lambda: sum(s.kv.nbytes() for s in list(self.sessions.values())),
                           lambda: sum(len(s.queue) for s in list(self.sessions.values())))

    @property
    def _read_count(self) -> int:
        """Entries per stream per read. COUNT also bounds how many session opens one iteration
        admits: under load an iteration takes a whole forward pass, so admitting only a few
        opens each time would leave new sessions waiting for minutes."""
        return max(8, self.settings.verifier.max_batch_sessions)

    @property
    def tick_s(self) -> float:
        """Lease renewal and load publishing period: a third of the shorter lifetime."""
        return min(self.settings.verifier.heartbeat_ttl_s, self.settings.pool.lease_ms / 1000) / 3

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, drain for up to drain_timeout_s, then hand sessions over."""
        bind(worker_id=self.worker_id)
        await self.startup()
        ticker = asyncio.create_task(self._tick_loop())
        try:
            await self._serve(stop)
            self.accepting = False
            deadline = time.monotonic() + self.settings.verifier.drain_timeout_s
            log.info("verifier.draining", sessions=len(self.sessions))
            while self.sessions and time.monotonic() < deadline:
                await self.iterate()
        finally:
            ticker.cancel()
            await self.shutdown()

    async def startup(self) -> None:
        await with_backoff(lambda: self.broker.ensure_group(self.broker.keys.sessions),
                           "ensure_group")
        await self.tick()
        # Session opens this consumer read before a restart but never acknowledged.
        for entry in await self.broker.read_pending(self.worker_id, self.broker.keys.sessions):
            await self._on_open(entry)
        arena = self.engine.arena
        log.info("verifier.started", model=self.model_name, vocab=self.engine.vocab_size,
                 peers=sorted(self.peers), kv_budget_tokens=arena.budget_tokens,
                 kv_arena_mib=round(arena.budget_tokens * arena.bytes_per_token / 2**20, 1))

    async def shutdown(self) -> None:
        """Release leases at once (peers adopt the sessions now, not after a lapse)."""
        log.info("verifier.stopped", unfinished_sessions=len(self.sessions),
                 forward_passes=self.engine.forward_passes, rounds=self.stats.rounds,
                 max_sessions_held=self.stats.max_sessions_held, adopted=self.stats.sessions_adopted)
        try:
            await self.pool.release(self.worker_id, list(self.sessions))
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

    async def _tick_loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as exc:  # noqa: BLE001 - the main loop reports broker trouble
                log.warning("verifier.tick_failed", error=str(exc))
            await asyncio.sleep(self.tick_s)

    async def tick(self) -> None:
        """Renew leases (dropping sessions another worker took), publish load, read peers' loads."""
        lost = await self.pool.renew(self.worker_id, list(self.sessions), self.settings.pool.lease_ms)
        for sid in lost:
            session = self.sessions.pop(sid, None)
            if session is not None:
                self.metrics.session_finished(session.tenant, "lost")
                session.kv.clear()
                self.stats.sessions_lost += 1
                log.warning("session.lost", session_id=sid, reason="lease held by another worker")
        await self._refresh_tenant_sessions()
        load = self.load()
        await self.pool.publish_load(self.worker_id, load)
        fresh = 3 * self.tick_s + 1
        loads = await self.pool.loads(fresh_s=fresh, prune_s=max(60.0, 10 * fresh))
        self.peers = {w: v for w, v in loads.items() if w != self.worker_id}
        await self.broker.heartbeat("verifier", self.worker_id, self.settings.verifier.heartbeat_ttl_s,
                                    _json(load))

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

    # ------------------------------------------------------------------ one iteration

    async def iterate(self) -> None:
        await self._maintain()
        ready = self._has_runnable_draft()
        block = None if ready else self._idle_block_ms()
        reading_opens = self.accepting and time.monotonic() >= self._opens_paused_until
        streams = [self.broker.keys.sessions] if reading_opens else []
        streams += [self.broker.keys.drafts(sid) for sid in self.sessions]
        if streams:
            count = self._read_count
            entries = await with_backoff(
                lambda: self.broker.read_work(self.worker_id, streams, block, count=count), "read_work")
            for entry in entries:
                await self._dispatch(entry)
        elif not ready:
            await asyncio.sleep(self._idle_block_ms() / 1000)
        await self._verify_ready()

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
        if entry.stream == self.broker.keys.sessions:
            await self._on_open(entry)
            return
        session = self.sessions.get(self.broker.keys.session_of(entry.stream))
        if session is None:
            # The session ended, or another worker owns it now: leave the entry pending (the
            # owner claims stale pending drafts; a deleted stream takes its pending list along).
            return
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
            if message.session_id in self.sessions:  # a duplicated open
                await self.broker.ack(entry.stream, entry.entry_id)
                return
        except WireError as exc:
            exc.session_id = exc.session_id or peek_session_id(raw)
            if exc.session_id in self.sessions:  # a bad open naming a live session must not end it
                exc.session_id = None
            await self._reject(exc.session_id, entry, exc, fatal=True)
            return
        if await self._defer_open(entry, message) or not await self._admit_tenant_session(entry, message):
            return
        sid = message.session_id
        if await self.pool.acquire(sid, self.worker_id, self.settings.pool.lease_ms):
            await self.pool.save_open(sid, raw)
            await self.broker.ensure_group(self.broker.keys.drafts(sid))
            self._hold(VerifierSession.from_open(message, self.limits.max_gamma))
            self.stats.sessions_opened += 1
            log.info("session.opened", session_id=sid, tenant=message.tenant,
                     prompt_tokens=int(message.prompt_ids.size),
                     max_new_tokens=message.sampling.max_new_tokens,
                     temperature=message.sampling.temperature, hops=entry.hops)
        else:
            log.info("session.open_ignored", session_id=sid, reason="another worker holds its lease")
        await self.broker.ack(entry.stream, entry.entry_id)

    def _hold(self, session: VerifierSession) -> None:
        self.sessions[session.session_id] = session
        self.metrics.session_opened(session.tenant)
        self.stats.max_sessions_held = max(self.stats.max_sessions_held, len(self.sessions))

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

    async def _admit_tenant_session(self, entry: Entry, message: SessionOpen) -> bool:
        """Count the session against its tenant's pool-wide limit (atomic in Redis); refuse if over."""
        limit = self._session_limit(message.tenant)
        if not limit:
            return True
        admitted, count = await self.pool.admit_session(message.tenant, message.session_id, limit,
                                                        self._tenant_entry_ms)
        if not admitted:
            await self._reject(message.session_id, entry, WireError(
                ErrorCode.TENANT_LIMIT, f"tenant {message.tenant!r} has {count} sessions in the pool, "
                f"its limit is {limit}", message.session_id), fatal=True)
        return admitted

    @property
    def _tenant_entry_ms(self) -> int:
        """Lifetime of a session's entry in its tenant's set, renewed with the lease.

        It outlives a lapsed lease by one more lease and a scan, so that a dead worker's sessions
        still count until a peer adopts them (adoption renews the entry, it never refuses).
        """
        return 2 * self.settings.pool.lease_ms + self.settings.pool.scan_interval_ms

    def _session_limit(self, tenant: str) -> int:
        """The tenant's pool-wide concurrent-session limit; 0: unlimited."""
        return self.settings.tenants.limits(tenant)[0]

    async def _refresh_tenant_sessions(self) -> None:
        """Renew the tenant-set entries of the sessions this worker still owns."""
        held: dict[str, list[str]] = {}
        for session in list(self.sessions.values()):
            if self._session_limit(session.tenant):
                held.setdefault(session.tenant, []).append(session.session_id)
        for tenant, sids in held.items():
            await self.pool.refresh_sessions(tenant, sids, self._tenant_entry_ms)

    async def _defer_open(self, entry: Entry, message: SessionOpen) -> bool:
        """Pass the open to a less loaded peer, or let it wait for KV room; True if not taken."""
        cfg = self.settings.pool
        since = entry.since_ms or now_ms()
        if should_pass_on(len(self.sessions), self.peers, entry.hops, cfg.max_open_hops, cfg.spread_slack):
            self.stats.opens_passed_on += 1
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
            await self._reject(message.session_id, entry, WireError(
                ErrorCode.CAPACITY, f"no KV room for {need} tokens (budget {cfg.kv_budget_tokens} tokens "
                f"per verifier) within {cfg.admission_wait_s}s"), fatal=True)
            return True
        await self.pool.pass_on_open(entry, entry.hops, since)  # waits in the stream
        self._opens_paused_until = time.monotonic() + cfg.scan_interval_ms / 1000
        return True

    def _evict(self, session: VerifierSession) -> None:
        session.kv.clear()
        session.evicted = True
        self.stats.evictions += 1
        log.info("session.evicted", session_id=session.session_id, reserve=session.reserve)

    async def _on_draft(self, session: VerifierSession, entry: Entry, draft: DraftBatch) -> None:
        if any(p.entry_id == entry.entry_id for p in session.queue):
            return  # claimed again while already queued
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
        session.last_active = time.monotonic()
        session.evicted = False

    async def _pay_for_drafts(self, ready: list[VerifierSession]) -> None:
        """Take rate-limited tenants' head drafts' tokens from their buckets, oldest drafts first.

        Drafts the bucket cannot cover yet stay queued (held back, not acked) and their edges are
        told once, with a typed non-fatal ``tenant_limit`` carrying the expected wait.
        """
        now = time.monotonic()
        due: dict[str, list[VerifierSession]] = {}
        for session in ready:
            if (self._draft_rate(session.tenant) and not self.throttle.is_paid(session)
                    and not self.throttle.held(session.tenant, now)):
                due.setdefault(session.tenant, []).append(session)
        for tenant, sessions in due.items():
            rate = self._draft_rate(tenant)
            costs = [s.queue[0].draft.gamma for s in sessions]
            taken, wait_s = await self.pool.take_draft_tokens(tenant, costs, rate, rate * BURST_S)
            for session in sessions[:taken]:
                self.throttle.pay(session)
            if taken < len(sessions):
                self.throttle.hold(tenant, now + wait_s)
                await self._tell_throttled(sessions[taken:], rate, wait_s, now)

    def _draft_rate(self, tenant: str) -> float:
        return self.settings.tenants.limits(tenant)[1]

    async def _tell_throttled(self, sessions: list[VerifierSession], rate: float, wait_s: float,
                              now: float) -> None:
        """Tell the edges of held drafts that they wait for their tenant's draft-token rate."""
        notices = []
        for session in sessions:
            if not self.throttle.should_tell(session, now):
                continue
            draft = session.queue[0].draft
            self.stats.drafts_throttled += 1
            self.metrics.draft_throttled(session.tenant)
            message = (f"tenant {session.tenant!r} is over its draft-token rate of {rate:g} per second: "
                       f"draft {draft.seq} waits about {wait_s:.3f}s")
            notices.append(RoundResult(session.session_id, encode(ErrorMessage(
                session.session_id, ErrorCode.TENANT_LIMIT, message, seq=draft.seq, fatal=False,
                retry_after_s=round(wait_s, 3))), []))
            log.info("draft.throttled", session_id=session.session_id, tenant=session.tenant,
                     seq=draft.seq, drafted=draft.gamma, wait_s=round(wait_s, 3))
        if notices:
            await self.broker.publish_round(notices)

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
        session.kv.clear()
        self.stats.sessions_finished += 1
        await self.broker.delete_session(session.session_id, self.settings.pool.finished_ttl_s)
        await self.pool.forget(session.session_id)
        if self._session_limit(session.tenant):
            await self.pool.leave_session(session.tenant, session.session_id)
        log.info("session.summary", session_id=session.session_id, tenant=session.tenant,
                 reason=reason, rounds=session.rounds, generated=session.generated,
                 drafted=session.drafted, accepted=session.accepted,
                 acceptance_rate=round(session.accepted / session.drafted, 4) if session.drafted else None,
                 seconds=round(time.monotonic() - session.opened_at, 3))

    # ------------------------------------------------------------------ pool maintenance

    async def _maintain(self) -> None:
        """Every scan interval: adopt lapsed sessions, reclaim stuck messages, expire abandoned."""
        now = time.monotonic()
        if now < self._next_scan:
            return
        self._next_scan = now + self.settings.pool.scan_interval_ms / 1000
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
            if await self.pool.acquire(sid, self.worker_id, cfg.lease_ms):
                await self._adopt(sid)

    async def _adopt(self, sid: str) -> None:
        """Rebuild a session from its open message and last round, then claim its pending drafts."""
        raw = await self.pool.load_open(sid)
        try:
            message = decode(raw or b"", self.limits)
        except WireError:
            message = None
        state = await self.broker.load_state(sid)
        if not isinstance(message, SessionOpen) or _finished(state):
            await self.pool.forget(sid)  # finished or expired meanwhile: nothing to adopt
            return
        session = VerifierSession.restore(message, state, self.limits.max_gamma)
        await self.broker.ensure_group(self.broker.keys.drafts(sid))
        if self._session_limit(session.tenant):  # admitted once: count it, never refuse it
            await self.pool.admit_session(session.tenant, sid, 0, self._tenant_entry_ms)
        self._hold(session)
        self.stats.sessions_adopted += 1
        log.info("session.adopted", session_id=sid, tenant=session.tenant, context=len(session.context),
                 next_seq=session.next_seq)
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
        payload = encode(ErrorMessage(session.session_id, ErrorCode.DEAD_LETTER, error, fatal=True))
        await self.broker.publish_round([RoundResult(session.session_id, payload, [])])
        await self._finish(session, ErrorCode.DEAD_LETTER.value)

    async def _claim_stuck_opens(self) -> None:
        """Opens a dead worker read but never acknowledged."""
        idle = 2 * self.settings.pool.lease_ms
        for entry in await self.broker.claim_idle(self.worker_id, self.broker.keys.sessions, idle):
            await self._on_open(entry)

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

    # ------------------------------------------------------------------ verification

    async def _select_batch(self) -> list[VerifierSession]:
        """Ready sessions chosen fairly across tenants (DRR) within the session and token budgets.

        Drafts held back for their tenant's draft-token rate are not ready: the scheduler sees
        only the other tenants (and the held tenant's paid drafts) until its bucket refills.
        """
        ready = sorted((s for s in self.sessions.values() if s.queue),
                       key=lambda s: s.queue[0].received_at)
        await self._pay_for_drafts(ready)
        self.throttle.prune(self.sessions, time.monotonic())
        ready = [s for s in ready if not self._draft_rate(s.tenant) or self.throttle.is_paid(s)]
        solo = [s for s in ready if s.solo]
        if solo:
            return solo[:1]
        queues: dict[str, list[tuple[str, int]]] = {}
        for session in ready:
            queues.setdefault(session.tenant, []).append(
                (session.session_id, session.input_tokens(session.queue[0])))
        budget = self.settings.verifier
        weights = {t: self.settings.tenants.limits(t)[2] for t in queues}
        chosen = self.scheduler.select(queues, budget.max_batch_sessions, budget.max_batch_tokens, weights)
        self.pool_load = load_figure(
            sum(cost for queue in queues.values() for _, cost in queue), len(ready),
            resident_tokens(self.sessions.values()), budget.max_batch_tokens, budget.max_batch_sessions,
            self.settings.pool.kv_budget_tokens)
        return [self.sessions[sid] for sid in chosen]

    async def _verify_ready(self) -> None:
        batch = await self._select_batch()
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
        try:
            outcomes = await asyncio.to_thread(self.engine.verify, requests)
        except Exception as exc:  # noqa: BLE001 - a failing pass must not take the worker down
            await self._batch_failed(batch, pending, exc)
            return
        verify_ms = (time.perf_counter() - started) * 1000
        self.stats.forward_passes += 1
        self.stats.batch_sizes.append(len(batch))
        self.metrics.observe_batch(len(batch), verify_ms)
        results = [self._complete(s, p, o, started_wall, verify_ms, len(batch))
                   for s, p, o in zip(batch, pending, outcomes, strict=True)
                   if self.sessions.get(s.session_id) is s]  # not lost to another worker meanwhile
        await with_backoff(lambda: self.broker.publish_round(results), "publish_round")
        for session in batch:
            if session.finished:
                await self._finish(session, session.finished)

    async def _batch_failed(self, batch: list[VerifierSession], pending: list[PendingDraft],
                            exc: Exception) -> None:
        """Retry each session alone; a draft that keeps failing goes to the dead letters."""
        log.error("verify.failed", error=repr(exc), sessions=[s.session_id for s in batch])
        for session, item in zip(batch, pending, strict=True):
            session.kv.clear()  # the pass may have appended part of its keys: recompute
            session.failures += 1
            session.solo = True
            if session.failures >= self.settings.pool.max_deliveries:
                session.queue.popleft()
                entry = Entry(self.broker.keys.drafts(session.session_id), item.entry_id, encode(item.draft))
                await self._dead_letter(session, entry, f"verification failed {session.failures} times: "
                                        f"{exc!r}"[:1000], session.failures)

    def _complete(self, session: VerifierSession, pending: PendingDraft, outcome: VerifyOutcome,
                  started_wall: float, verify_ms: float, batch_size: int) -> RoundResult:
        session.queue.popleft()
        session.failures, session.solo, session.last_active = 0, False, time.monotonic()
        draft = pending.draft
        kept, finish = session.commit(draft, outcome)
        queue_ms = max(0.0, (started_wall - draft.sent_at) * 1000) if draft.sent_at else 0.0
        verdict = Verdict(
            session_id=session.session_id, seq=draft.seq, accepted=outcome.accepted,
            token=outcome.token, committed=len(session.context), finish_reason=finish,
            queue_ms=round(queue_ms, 3), verify_ms=round(verify_ms, 3), batch_size=batch_size,
            worker_id=self.worker_id, pool_load=self.pool_load,
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


def _finished(state: dict[bytes, bytes]) -> bool:
    """Whether the last persisted verdict ended the session (its owner died before cleaning up)."""
    raw = state.get(b"last_verdict")
    if not raw:
        return False
    try:
        message = decode(raw)
    except WireError:
        return False
    return isinstance(message, Verdict) and message.finish_reason is not None


def _json(value: dict[str, Any]) -> bytes:
    import json

    return json.dumps(value).encode()
