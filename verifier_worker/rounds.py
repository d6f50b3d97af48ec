"""Verification rounds: queue drafts idempotently, choose a fair batch, verify it, commit fenced.

Delivery is at least once and edges re-send a draft whose verdict is late, so a draft may arrive
more than once: a copy of the draft at the tail of a session's queue is dropped, a copy of the
draft verified last gets its verdict again, older copies are dropped; none is an error. A draft
ahead of the session (the edge saw verdicts that Redis later lost) gets a non-fatal
``out_of_order`` notice carrying the committed length, from which the edge resumes.

Each round's commit (verdict, new tokens, next seq, ack) is one fenced script per session
(broker.rounds): a worker whose lease changed hands writes nothing.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from broker.rounds import DONE, FENCED, Commit
from broker.streams import Entry, SessionDataError, mac, with_backoff
from common import tracing
from common.integrity import draft_digest, u32
from common.wire import DraftBatch, ErrorCode, ErrorMessage, Verdict, WireError, encode
from verifier_worker.capacity import load_figure, resident_tokens
from verifier_worker.core import Renew, SessionWrites, WorkerState, log
from verifier_worker.engine import VerifyOutcome
from verifier_worker.scheduler import DrrScheduler
from verifier_worker.session import PendingDraft, VerifierSession
from verifier_worker.tenants import BURST_S, DraftThrottle


def _u32(tokens: list[int]) -> bytes:
    return np.asarray(tokens, dtype="<u4").tobytes()


class Rounds:
    """Queues drafts, chooses each batch, verifies it in one pass and commits its rounds."""

    def __init__(self, state: WorkerState, writes: SessionWrites, renew: Renew) -> None:
        self.state = state
        self.writes = writes
        self.renew = renew
        self.scheduler = DrrScheduler()
        self.throttle = DraftThrottle()
        self.pool_load = 0.0  # the load figure of the last batch choice, sent in each verdict

    # ------------------------------------------------------------------ drafts in

    async def on_draft(self, session: VerifierSession, entry_id: str, draft: DraftBatch) -> None:
        if any(p.entry_id == entry_id for p in session.queue):
            return  # claimed again while already queued
        tail = session.queue[-1].draft.seq if session.queue else session.next_seq - 1
        if draft.seq <= tail:
            await self._duplicate(session, entry_id, draft)
            return
        if draft.seq != tail + 1:
            await self.writes.reject(session, entry_id, WireError(
                ErrorCode.OUT_OF_ORDER, f"draft seq {draft.seq}, expected {tail + 1}: resume from "
                f"{len(session.context)} committed tokens"), committed=len(session.context))
            return
        session.queue.append(PendingDraft(entry_id, draft, time.time()))
        session.last_active = time.monotonic()
        session.evicted = session.adopted_idle = False

    async def _duplicate(self, session: VerifierSession, entry_id: str, draft: DraftBatch) -> None:
        """A copy of a draft already queued or verified: answer the last verdict again, or drop it."""
        self.state.stats.duplicates += 1
        log.info("draft.duplicate", session_id=session.session_id, seq=draft.seq, next_seq=session.next_seq)
        if draft.seq == session.next_seq - 1 and session.last_verdict is not None:
            await self.writes.fenced_notice(session, session.last_verdict, entry_id)
            return
        await self.state.writer.ack_foreign(self.state.broker.keys.drafts(session.session_id), entry_id)

    # ------------------------------------------------------------------ tenants' draft rates

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
            taken, wait_s = await self.state.pool.take_draft_tokens(tenant, costs, rate, rate * BURST_S)
            for session in sessions[:taken]:
                self.throttle.pay(session)
            if taken < len(sessions):
                self.throttle.hold(tenant, now + wait_s)
                await self._tell_throttled(sessions[taken:], rate, wait_s, now)

    def _draft_rate(self, tenant: str) -> float:
        return self.state.settings.tenants.limits(tenant)[1]

    async def _tell_throttled(self, sessions: list[VerifierSession], rate: float, wait_s: float,
                              now: float) -> None:
        """Tell the edges of held drafts that they wait for their tenant's draft-token rate."""
        for session in sessions:
            if not self.throttle.should_tell(session, now):
                continue
            draft = session.queue[0].draft
            self.state.stats.drafts_throttled += 1
            self.state.metrics.draft_throttled(session.tenant)
            message = (f"tenant {session.tenant!r} is over its draft-token rate of {rate:g} per second: "
                       f"draft {draft.seq} waits about {wait_s:.3f}s")
            notice = ErrorMessage(session.session_id, ErrorCode.TENANT_LIMIT, message, seq=draft.seq,
                                  fatal=False, retry_after_s=round(wait_s, 3))
            await self.writes.notify(session, notice)
            log.info("draft.throttled", session_id=session.session_id, tenant=session.tenant,
                     seq=draft.seq, drafted=draft.gamma, wait_s=round(wait_s, 3))

    # ------------------------------------------------------------------ one batch

    async def _select_batch(self) -> list[VerifierSession]:
        """Ready sessions chosen fairly across tenants (DRR) within the session and token budgets.

        Drafts held back for their tenant's draft-token rate are not ready: the scheduler sees
        only the other tenants (and the held tenant's paid drafts) until its bucket refills.
        """
        ready = sorted((s for s in self.state.sessions.values() if s.queue),
                       key=lambda s: s.queue[0].received_at)
        await self._pay_for_drafts(ready)
        self.throttle.prune(self.state.sessions, time.monotonic())
        ready = [s for s in ready if (not self._draft_rate(s.tenant) or self.throttle.is_paid(s))
                 and self.state.holds(s)]
        solo = [s for s in ready if s.solo]
        if solo:
            return solo[:1]
        queues: dict[str, list[tuple[str, int]]] = {}
        for session in ready:
            queues.setdefault(session.tenant, []).append(
                (session.session_id, session.input_tokens(session.queue[0])))
        budget = self.state.settings.verifier
        weights = {t: self.state.settings.tenants.limits(t)[2] for t in queues}
        chosen = self.scheduler.select(queues, budget.max_batch_sessions, budget.max_batch_tokens, weights)
        ready_tokens = sum(cost for queue in queues.values() for _, cost in queue)
        self.pool_load = self._load_figure(ready_tokens, len(ready))
        return [self.state.sessions[sid] for sid in chosen]

    def _load_figure(self, ready_tokens: int, ready_sessions: int) -> float:
        settings = self.state.settings
        budget = settings.verifier
        return load_figure(ready_tokens, ready_sessions, resident_tokens(self.state.sessions.values()),
                           budget.max_batch_tokens, budget.max_batch_sessions, settings.pool.kv_budget_tokens)

    def has_runnable_draft(self) -> bool:
        """A queued draft that may be verified now (not held back for its tenant's rate)."""
        now = time.monotonic()
        return any(s.queue and not (self.throttle.held(s.tenant, now) and not self.throttle.is_paid(s))
                   for s in self.state.sessions.values())

    def idle_block_ms(self) -> int:
        """How long a read may block: the idle block, or less when a held tenant's wait ends first."""
        block = self.state.settings.verifier.idle_block_ms
        release = self.throttle.next_release(time.monotonic())
        return block if release is None else max(1, min(block, int(release * 1000) + 1))

    async def _valid(self, batch: list[VerifierSession]) -> list[VerifierSession]:
        """Drop (with a non-fatal notice) head drafts that do not continue their session."""
        valid = []
        for session in batch:
            item = session.queue[0]
            try:
                session.check_draft(item.draft)
            except WireError as exc:
                session.queue.popleft()
                await self.writes.reject(session, item.entry_id, exc, committed=len(session.context))
                continue
            valid.append(session)
        return valid

    async def verify_ready(self) -> None:
        batch = await self._valid(await self._select_batch())
        if not batch:
            return
        pending = [s.queue[0] for s in batch]
        started_ns = tracing.now_ns() if tracing.enabled() else 0
        started_wall, started = time.time(), time.perf_counter()
        requests = [s.request(p) for s, p in zip(batch, pending, strict=True)]
        try:
            outcomes = await asyncio.to_thread(self.state.engine.verify, requests)
        except Exception as exc:  # noqa: BLE001 - a failing pass must not take the worker down
            await self._batch_failed(batch, pending, exc)
            return
        verify_ms = (time.perf_counter() - started) * 1000
        self.state.stats.forward_passes += 1
        self.state.stats.batch_sizes.append(len(batch))
        self.state.metrics.observe_batch(len(batch), verify_ms)
        done = [(s, self._complete(s, p, o, started_wall, verify_ms, len(batch)))
                for s, p, o in zip(batch, pending, outcomes, strict=True)
                if self.state.holds(s)]  # not lost to another worker meanwhile
        if started_ns:
            self._trace_pass(done, started_ns, verify_ms)
        await self._commit(done)
        for session, _ in done:
            if session.finished and self.state.holds(session):
                await self.writes.finish(session, session.finished)

    def _trace_pass(self, done: list[tuple[VerifierSession, Commit]], started_ns: int,
                    verify_ms: float) -> None:
        """One span per verified session round, in the session's own trace, and the pass itself
        (its own trace) linked to each of them."""
        ended_ns = tracing.now_ns()
        rounds = []
        for session, _ in done:
            if not session.trace:
                continue  # its edge does not trace
            span = tracing.start_span("specd.verifier.round", session.trace, start_ns=started_ns,
                                      session_id=session.session_id, tenant=session.tenant,
                                      seq=session.next_seq - 1, committed=len(session.context),
                                      worker_id=self.state.worker_id)
            tracing.end_span(span, ended_ns)
            rounds.append(tracing.traceparent(span))
        tracing.end_span(tracing.start_span("specd.verifier.pass", links=rounds, start_ns=started_ns,
                                            sessions=len(done), verify_ms=round(verify_ms, 3),
                                            worker_id=self.state.worker_id), ended_ns)

    async def _batch_failed(self, batch: list[VerifierSession], pending: list[PendingDraft],
                            exc: Exception) -> None:
        """Retry each session alone; a draft that keeps failing goes to the dead letters."""
        log.error("verify.failed", error=repr(exc), sessions=[s.session_id for s in batch])
        for session, item in zip(batch, pending, strict=True):
            session.kv.clear()  # the pass may have appended part of its keys: recompute
            session.failures += 1
            session.solo = True
            if session.failures >= self.state.settings.pool.max_deliveries:
                session.queue.popleft()
                stream = self.state.broker.keys.drafts(session.session_id)
                entry = Entry(stream, item.entry_id, encode(item.draft))
                error = f"verification failed {session.failures} times: {exc!r}"[:1000]
                await self.writes.dead_letter(session, entry, error, session.failures)

    def _complete(self, session: VerifierSession, pending: PendingDraft, outcome: VerifyOutcome,
                  started_wall: float, verify_ms: float, batch_size: int) -> Commit:
        session.queue.popleft()
        session.failures, session.solo, session.last_active = 0, False, time.monotonic()
        draft = pending.draft
        kept, finish = session.commit(draft, outcome)
        queue_ms = max(0.0, (started_wall - draft.sent_at) * 1000) if draft.sent_at else 0.0
        verdict = Verdict(
            session_id=session.session_id, seq=draft.seq, accepted=outcome.accepted,
            token=outcome.token, committed=len(session.context), finish_reason=finish,
            queue_ms=round(queue_ms, 3), verify_ms=round(verify_ms, 3), batch_size=batch_size,
            worker_id=self.state.worker_id, pool_load=self.pool_load,
            drafted=draft_digest(draft.start, u32(draft.token_ids)), context_digest=session.digest.digest(),
            logprobs=outcome.logprobs.head(kept) if outcome.logprobs is not None else None,
            feature=outcome.feature if finish is None else b"",
        )
        payload = encode(verdict)
        session.last_verdict = payload
        self.state.stats.rounds += 1
        self.state.metrics.observe_round(session.tenant, draft.gamma, outcome.accepted, queue_ms)
        log.info("verify.round", session_id=session.session_id, tenant=session.tenant,
                 **tracing.log_ids(session.trace),
                 seq=draft.seq, drafted=draft.gamma, accepted=outcome.accepted, committed=kept,
                 context=len(session.context), batch_size=batch_size, queue_ms=round(queue_ms, 3),
                 verify_ms=round(verify_ms, 3), draft_ms=round(draft.draft_ms, 3), finish=finish)
        return self._commit_of(session, pending.entry_id)

    def _commit_of(self, session: VerifierSession, ack_id: str) -> Commit:
        """Only the tokens Redis lacks (the round's), or the whole context when it must be rewritten."""
        full = session.repair
        tokens = session.context if full else session.context[session.stored:]
        payload = session.last_verdict or b""
        return Commit(session.session_id, session.lease, 4 * session.stored, _u32(tokens), session.next_seq,
                      payload, mac(session.key, payload), ack_id, full)

    # ------------------------------------------------------------------ commits out

    async def _commit(self, done: list[tuple[VerifierSession, Commit]]) -> None:
        """Commit the batch's rounds; repair, re-fence or drop sessions whose commit was refused."""
        for _attempt in range(3):
            if not done:
                return
            commits = [c for _, c in done]
            replies = await with_backoff(lambda: self.state.writer.commit(commits), "commit_rounds",  # noqa: B023
                                         self.state.stopping)
            retry = []
            for (session, commit), reply in zip(done, replies, strict=True):
                again = await self._committed(session, commit, reply)
                if again:
                    retry.append((session, self._commit_of(session, commit.ack_id)))
            done = retry
        for session, _ in done:
            self.state.drop(session, "commit refused three times")

    async def _committed(self, session: VerifierSession, commit: Commit, reply: int | Exception) -> bool:
        """Apply one commit's reply; True when it should be tried again (repaired or re-fenced)."""
        if reply == DONE:
            session.stored, session.repair = len(session.context), False
            return False
        if isinstance(reply, SessionDataError):  # one of its keys replaced by its tenant
            await self.writes.session_data_failed(session.session_id, reply, session.key, session)
            return False
        if isinstance(reply, Exception):
            log.error("commit.failed", session_id=session.session_id, error=str(reply))
            self.state.drop(session, f"commit failed: {reply}")
            return False
        if reply == FENCED:
            if session.lease == commit.lease:
                await self.renew([session])  # Redis may have lost the lease: take it again
            if self.state.holds(session) and session.lease != commit.lease:
                return True
            self.state.drop(session, "fenced: the lease is no longer this worker's")
            return False
        if reply < commit.stored_bytes:  # Redis lost committed tokens: rewrite them from memory
            self.state.stats.repairs += 1
            session.repair = True
            log.warning("commit.repair", session_id=session.session_id, stored=reply // 4,
                        expected=commit.stored_bytes // 4)
            return True
        self.state.drop(session, f"stale: Redis holds {reply // 4} committed tokens, this worker "
                   f"{commit.stored_bytes // 4}")
        await self.state.pool.release({session.session_id: session.lease})
        return False
