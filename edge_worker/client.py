"""The edge side of a session: draft, send, await the verdict, accept, repeat.

Drafting runs in a worker thread (torch releases the GIL), bounded by a semaphore, so one edge
process serves several sessions at once while their drafts and verdicts are in flight.

Gamma per round comes from a ``GammaController`` (fixed, or adaptive). With drafting ahead, the
edge drafts round ``seq + 1`` while round ``seq`` is verified, assuming every draft is accepted
and the bonus token equals the draft's own greedy guess; the early batch is sent iff the verdict
bears that out (the committed context equals the assumed one), otherwise it is cancelled and
dropped, and the backend rolls its cache back on the next proposal. The early batch is the very
batch the edge would have drafted after the verdict: the same context and the same ``seq``, so
the same draws for sampled sessions; exactness does not depend on it.

Each session's key is derived from the pool's secret, its id and a random nonce sent in its open
(common.integrity); the open, every draft and the close carry a MAC under it. Waiting for a
verdict (authentication, binding to the drafted tokens, notices, re-sends, resuming after Redis
lost rounds) lives in ``edge_worker.waiting``.

A session's first draft is written before its open: a verifier that reads the open finds the
session's draft stream, its sign that an edge is there (``verifier_worker.capacity.triage_open``);
opens without one are dropped while their tenant has a backlog, so idle opens never hold live
sessions back.
"""

from __future__ import annotations

import asyncio
import copy
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from redis.exceptions import NoPermissionError, ResponseError

from broker.streams import TRANSIENT_ERRORS, Broker, new_session_id, with_backoff
from common import tracing
from common.integrity import ContextDigest, draft_digest, mac, session_key, u32
from common.logs import get_logger
from common.metrics import EdgeMetrics
from common.prompt_limits import prompt_problem
from common.sampling import SamplingParams, apply_stop_rules
from common.wire import (
    DraftBatch,
    ErrorCode,
    SamplingSpec,
    SessionClose,
    SessionOpen,
    Verdict,
    encode,
)
from edge_worker.adaptive import GammaController
from edge_worker.backends.base import DraftBackend, Proposal, cut_options
from edge_worker.backpressure import Backpressure
from edge_worker.waiting import SessionFailed, VerdictWaiter

log = get_logger("specd.edge")


class PromptRejected(SessionFailed):
    """The edge refused the prompt before opening a session (empty, or longer than the context)."""


def redis_refusal(exc: ResponseError) -> SessionFailed:
    """A Redis error reply as a session failure: ``forbidden`` for an ACL refusal (NOPERM), else
    ``invalid_state`` (a key of the wrong type, a stream whose ids block new entries)."""
    if isinstance(exc, NoPermissionError):
        return SessionFailed(ErrorCode.FORBIDDEN, f"Redis refused a command under this edge's ACL user: {exc}"
                             " (check [redis] username and the rules `specd acl` prints)")
    return SessionFailed(ErrorCode.INVALID_STATE, f"Redis refused the session's keys: {exc}")


def check_prompt(prompt_ids: list[int], spec: SamplingSpec, config: EdgeConfig) -> None:
    """Raise ``PromptRejected`` for a prompt the model cannot take; nothing is sent for it."""
    problem = prompt_problem(len(prompt_ids), spec.max_new_tokens, config.max_context, "the draft model")
    if problem:
        code = ErrorCode.MALFORMED if not prompt_ids else ErrorCode.LIMIT_EXCEEDED
        raise PromptRejected(code, problem)


@dataclass
class SessionResult:
    session_id: str
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    target_forward_passes: int = 0
    seed: int = 0
    draft_ms: float = 0.0
    queue_ms: float = 0.0
    verify_ms: float = 0.0
    transport_ms: float = 0.0
    wall_ms: float = 0.0
    first_token_ms: float = 0.0
    round_ms: list[float] = field(default_factory=list)
    gammas: list[int] = field(default_factory=list)  # gamma asked for per round
    ahead_hits: int = 0  # rounds whose batch was drafted ahead and sent at once
    ahead_misses: int = 0  # batches drafted ahead and dropped
    throttled: int = 0  # drafts held back for the tenant's draft-token rate (non-fatal notices)
    resends: int = 0  # drafts (or the open) sent again after no verdict within the resend budget
    forged: int = 0  # verdict-stream entries dropped because their MAC did not verify
    forged_drafts: int = 0  # drafts someone else put in this session's stream (refused by the verifier)
    rewinds: int = 0  # times the edge resumed from a shorter committed context (Redis lost rounds)
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when the session asked

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per round, the recovered/bonus token included."""
        return len(self.token_ids) / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / (self.wall_ms / 1000) if self.wall_ms else 0.0

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("round_ms")
        data.pop("gammas")
        data.pop("logprobs")  # per-token data, not a figure (the result keeps it)
        for key in ("draft_ms", "queue_ms", "verify_ms", "transport_ms", "wall_ms", "first_token_ms"):
            data[key] = round(data[key], 3)
        data.update(acceptance_rate=round(self.acceptance_rate, 4),
                    mean_accepted_length=round(self.mean_accepted_length, 4),
                    tokens_per_s=round(self.tokens_per_s, 2), tokens=len(self.token_ids),
                    mean_gamma=round(sum(self.gammas) / len(self.gammas), 3) if self.gammas else 0.0)
        return data


@dataclass(frozen=True)
class TokenLogprob:
    """The target's log-probability of one generated token and its ``top`` alternatives
    (``(token id, logprob)``, most likely first), from the pass that committed it."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


TokenCallback = Callable[[str, list[int]], None]
LogprobCallback = Callable[[str, list[TokenLogprob]], None]
"""Called just before ``TokenCallback`` with the same tokens' logprobs (sessions that ask)."""


@dataclass(frozen=True)
class EdgeConfig:
    gamma: int = 4
    max_support: int = 64
    verdict_timeout_s: float = 60.0
    tenant: str = "default"
    target_model: str = ""
    adaptive_gamma: bool = False
    gamma_min: int = 1
    gamma_max: int = 8
    draft_ahead: bool = False
    draft_confidence: float = 0.0  # stop a round's drafting below this draft probability
    draft_open_confidence: float = 0.0  # draft nothing when the first token is less likely than this
    max_context: int = 0  # positions of the draft model (0: unknown); prompts are checked against it
    resend_after_s: float = 0.0  # 0: a quarter of verdict_timeout_s, at most 5 s
    verdict_secret: str = ""

    @property
    def resend_s(self) -> float:
        return self.resend_after_s or min(5.0, self.verdict_timeout_s / 4)

    def controller(self) -> GammaController:
        return GammaController(gamma=self.gamma, adaptive=self.adaptive_gamma, gamma_min=self.gamma_min,
                               gamma_max=self.gamma_max, draft_ahead=self.draft_ahead)


@dataclass
class _Draft:
    """A proposal ready to send: drafted now, or ahead while the previous round was verified."""

    proposal: Proposal
    compute_ms: float  # time the backend spent drafting it
    wait_ms: float  # time the round waited for it (near zero when drafted ahead)


@dataclass
class _Ahead:
    """Drafting of the next round in flight, under the assumption of a full acceptance."""

    assumed: list[int]  # the context if every draft is accepted, before the bonus token
    cancel: threading.Event = field(default_factory=threading.Event)
    guess: int | None = None  # the draft's guess of the bonus token, once known
    task: asyncio.Task[_Draft | None] | None = None

    def holds(self, context: list[int]) -> bool:
        """Whether the committed ``context`` is the one this batch was drafted for."""
        return context == [*self.assumed, self.guess]

    def may_hold(self, context: list[int]) -> bool:
        return (len(context) == len(self.assumed) + 1 and context[:-1] == self.assumed
                and self.guess in (None, context[-1]))


class EdgeClient:
    """Runs sessions for one draft backend against the verifier pool through the broker."""

    def __init__(self, backend: DraftBackend, broker: Broker, config: EdgeConfig,
                 max_concurrent_sessions: int = 8) -> None:
        self.backend = backend
        self.broker = broker
        self.config = config
        self._slots = asyncio.Semaphore(max_concurrent_sessions)
        self._draft_lock = asyncio.Lock()  # one forward at a time on the shared draft model
        self.metrics = EdgeMetrics()

    def for_tenant(self, tenant: str) -> EdgeClient:
        """A client whose sessions carry ``tenant`` (its key space) and share this one's draft
        backend, broker, session slots, metrics and one-forward-at-a-time draft lock."""
        sibling = copy.copy(self)
        sibling.config = replace(self.config, tenant=tenant)
        return sibling

    def session_id(self) -> str:
        """A new session id: the tenant prefix puts the session in its tenant's key space."""
        return new_session_id(self.config.tenant)

    async def generate(self, prompt_ids: list[int], spec: SamplingSpec,
                       on_tokens: TokenCallback | None = None, session_id: str = "",
                       logprobs: int | None = None,
                       on_logprobs: LogprobCallback | None = None) -> SessionResult:
        """One session. ``logprobs`` (None: none): the target's logprob of every generated token
        and its top ``logprobs`` alternatives, in ``SessionResult.logprobs`` and ``on_logprobs``."""
        check_prompt(prompt_ids, spec, self.config)
        async with self._slots:
            session = _EdgeSession(self, prompt_ids, spec, on_tokens, session_id)
            session.want_logprobs(logprobs, on_logprobs)
            try:
                return await session.run()
            except ResponseError as exc:  # a reply its tenant's keys shaped, or an ACL refusal: typed
                raise redis_refusal(exc) from exc


class _EdgeSession(VerdictWaiter):
    def __init__(self, client: EdgeClient, prompt_ids: list[int], spec: SamplingSpec,
                 on_tokens: TokenCallback | None, session_id: str) -> None:
        self.client = client
        self.sid = session_id or client.session_id()
        self.nonce = os.urandom(32)
        self.key = session_key(client.config.verdict_secret, self.sid, self.nonce)
        self.seq = 0
        self.emitted: list[int] = []  # tokens handed to on_tokens (a rewind never repeats them)
        self.sent: bytes = b""  # the current draft, as sent (re-sent unchanged)
        self.sent_tag: bytes = b""  # its MAC
        self.bound: bytes = b""  # its draft_digest: the verdict must name the same
        self.open_payload = b""
        self.open_tag = b""
        self.opened = False  # the open is queued (after the first draft: verifiers drop opens without one)
        self.spec = spec
        self.params = SamplingParams.of(spec)
        self.stops = frozenset(spec.stop_token_ids)
        self.context = list(prompt_ids)
        self.digest = ContextDigest(u32(prompt_ids))  # of the committed context: verdicts carry it too
        self.result = SessionResult(self.sid, list(prompt_ids), seed=spec.seed)
        self.on_tokens = on_tokens
        self.state = client.backend.new_state()
        self.last_verdict_id = "0-0"
        self.gammas = client.config.controller()
        self.ahead: _Ahead | None = None
        self.pressure = Backpressure()  # verifier load from verdicts: shorter drafts or a wait
        self.span: Any = None  # the session's trace span (tracing on), else None
        self.logprobs: int | None = None
        self.on_logprobs: LogprobCallback | None = None

    def want_logprobs(self, top: int | None, on_logprobs: LogprobCallback | None) -> None:
        self.logprobs, self.on_logprobs = top, on_logprobs
        self.result.logprobs = [] if top is not None else None

    async def run(self) -> SessionResult:
        broker, backend = self.client.broker, self.client.backend
        started = time.perf_counter()
        self.span = tracing.start_span("specd.session", session_id=self.sid, tenant=self.client.config.tenant,
                                       drafter=backend.model_name)
        opened = SessionOpen(
            session_id=self.sid, prompt_ids=_u32(self.context), sampling=self.spec,
            draft_model=backend.model_name, vocab_fingerprint=backend.fingerprint,
            tenant=self.client.config.tenant, target_model=self.client.config.target_model,
            nonce=self.nonce, logprobs=self.logprobs, trace=tracing.traceparent(self.span),
            features=backend.wants_features,
        )
        self.open_payload = encode(opened)
        self.open_tag = mac(self.key, self.open_payload)
        tenant, metrics = self.client.config.tenant, self.client.metrics
        metrics.session_started(tenant)
        try:
            while self.result.finish_reason is None:
                await self._round(self.seq)
                if self.result.rounds == 1:
                    self.result.first_token_ms = (time.perf_counter() - started) * 1000
        except SessionFailed as exc:
            log.warning("edge.session.failed", session_id=self.sid, code=exc.code.value, error=str(exc),
                        **tracing.log_ids(self.span))
            metrics.error(exc.code.value)
            raise
        finally:
            tracing.end_span(self.span, rounds=self.result.rounds, tokens=len(self.result.token_ids),
                             accepted=self.result.accepted, drafted=self.result.drafted,
                             finish=self.result.finish_reason or "failed")
            await self._drop_ahead()
            metrics.session_ended(tenant, self.result.finish_reason or "failed")
            backend.release(self.state)
            self.result.wall_ms = (time.perf_counter() - started) * 1000
            if self.result.finish_reason is None:  # tell the verifier to free the session now
                close = encode(SessionClose(self.sid, "aborted"))
                await _quietly(asyncio.wait_for(
                    broker.send_draft(self.sid, close, mac(self.key, close)), 2.0))
        log.info("edge.session.summary", **tracing.log_ids(self.span), **{
            k: v for k, v in self.result.summary().items() if k not in ("token_ids", "prompt_ids")})
        return self.result

    async def _round(self, seq: int) -> None:
        """One round, traced as a child of the session's span when tracing is on."""
        span = tracing.start_span("specd.edge.round", self.span, seq=seq)
        accepted = -1  # -1: no verdict applied (failed, or resumed from a shorter context)
        try:
            accepted = await self._run_round(seq)
        finally:
            tracing.end_span(span, accepted=accepted)

    async def _run_round(self, seq: int) -> int:
        """Draft (or take the batch drafted ahead) -> send -> await verdict -> accept."""
        draft = await self._next_draft(seq)
        proposal = draft.proposal
        ids, sizes, support_ids, support_probs = proposal.wire_arrays()
        message = DraftBatch(
            session_id=self.sid, seq=seq, start=len(self.context), token_ids=ids,
            support_sizes=sizes, support_ids=support_ids, support_probs=support_probs,
            sent_at=time.time(), draft_ms=round(draft.wait_ms, 3),
        )
        sent = time.perf_counter()
        self.sent = encode(message)
        self.sent_tag, self.bound = mac(self.key, self.sent), draft_digest(message.start, u32(ids))
        await self._redis(lambda: self.client.broker.send_draft(self.sid, self.sent, self.sent_tag),
                          "send_draft")
        if not self.opened:  # the first draft goes first: a verifier that reads the open finds it
            await self._redis(lambda: self.client.broker.open_session(self.sid, self.open_payload,
                                                                      self.open_tag), "open_session")
            self.opened = True
        self._start_ahead(seq, proposal.token_ids)
        verdict = await self._await_verdict(seq)
        if verdict is None:  # the verifier committed fewer tokens than this edge holds: resumed
            await self._drop_ahead()
            return -1
        round_ms = (time.perf_counter() - sent) * 1000
        self._accept(proposal.token_ids, verdict, draft.wait_ms, round_ms)
        self.seq += 1
        self.gammas.observe(len(proposal.token_ids), verdict.accepted, draft.compute_ms, round_ms)
        return verdict.accepted

    async def _redis(self, operation: Callable[[], Any], what: str) -> Any:
        """A write to Redis, retried while it is unreachable, for at most the verdict timeout."""
        try:
            return await with_backoff(operation, what, give_up_s=self.client.config.verdict_timeout_s)
        except TRANSIENT_ERRORS as exc:
            raise SessionFailed(ErrorCode.UNAVAILABLE, f"Redis unreachable for "
                                f"{self.client.config.verdict_timeout_s}s ({what}): {exc}") from exc

    def _room(self, context_len: int) -> int:
        """Draft tokens a round may still send: the verdict always adds one token."""
        return self.spec.max_new_tokens - (context_len - len(self.result.prompt_ids)) - 1

    async def _next_draft(self, seq: int) -> _Draft:
        """The batch drafted ahead if the verdict bore its assumption out, else a fresh one."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead.task is not None:
            started = time.perf_counter()
            if not ahead.may_hold(self.context):
                ahead.cancel.set()  # stop after the current token; its thread must still finish
            draft = await ahead.task
            if draft is not None and ahead.holds(self.context):
                self.result.ahead_hits += 1
                draft.wait_ms = (time.perf_counter() - started) * 1000
                self.result.gammas.append(len(draft.proposal.token_ids))
                return draft
            self.result.ahead_misses += 1
        # The controller's choice, shortened (with a wait) when the pool reports saturation.
        gamma = await self.pressure.before_round(self.gammas.choose(self._room(len(self.context))))
        self.result.gammas.append(gamma)
        started = time.perf_counter()
        proposal, compute_ms = await self._draft(list(self.context), gamma, seq)
        return _Draft(proposal, compute_ms, (time.perf_counter() - started) * 1000)

    async def _draft(self, context: list[int], gamma: int, seq: int) -> tuple[Proposal, float]:
        def work() -> tuple[Proposal, float]:
            started = time.perf_counter()
            config = self.client.config
            backend = self.client.backend
            proposal = backend.propose(self.state, context, gamma, self.params, seq, self.stops,
                                       config.max_support, None,
                                       **cut_options(backend, config.draft_confidence,
                                                                 config.draft_open_confidence))
            return proposal, (time.perf_counter() - started) * 1000

        async with self.client._draft_lock:
            return await asyncio.to_thread(work)

    def _start_ahead(self, seq: int, drafted: list[int]) -> None:
        """Draft round ``seq + 1`` now, assuming ``drafted`` all accepted (see the module doc)."""
        ahead = _Ahead([*self.context, *drafted])
        if (not self.client.config.draft_ahead or not drafted or self.stops.intersection(drafted)
                or self._room(len(ahead.assumed) + 1) < 1 or self.client.backend.wants_features):
            return  # nothing drafted, a full acceptance would end the session, or the next
            # round's drafting needs this verdict's feature
        backend = self.client.backend

        def work() -> _Draft | None:
            started = time.perf_counter()
            ahead.guess = backend.guess_next(self.state, ahead.assumed)
            if ahead.guess in self.stops or ahead.cancel.is_set():
                return None
            context = [*ahead.assumed, ahead.guess]
            gamma = self.gammas.choose(self._room(len(context)))
            config = self.client.config
            proposal = backend.propose(self.state, context, gamma, self.params, seq + 1, self.stops,
                                       config.max_support, ahead.cancel,
                                       **cut_options(backend, config.draft_confidence,
                                                                 config.draft_open_confidence))
            return _Draft(proposal, (time.perf_counter() - started) * 1000, 0.0)

        async def run() -> _Draft | None:
            async with self.client._draft_lock:
                return None if ahead.cancel.is_set() else await asyncio.to_thread(work)

        ahead.task = asyncio.create_task(run())
        self.ahead = ahead

    async def _drop_ahead(self) -> None:
        """Cancel drafting ahead and wait for its thread: the state is not shared while it runs."""
        ahead, self.ahead = self.ahead, None
        if ahead is None or ahead.task is None:
            return
        ahead.cancel.set()
        try:
            await ahead.task
        except Exception as exc:  # noqa: BLE001 - the session is ending; its draft is moot
            log.warning("edge.draft_ahead_failed", session_id=self.sid, error=str(exc))

    def _accept(self, drafted: list[int], verdict: Verdict, draft_ms: float, round_ms: float) -> None:
        new_tokens = [*drafted[:verdict.accepted], verdict.token]
        generated = len(self.context) - len(self.result.prompt_ids)
        kept, finish = apply_stop_rules(new_tokens, generated, self.stops, self.spec.max_new_tokens)
        self.context.extend(kept)
        if len(self.context) != verdict.committed or finish != verdict.finish_reason:
            raise SessionFailed(ErrorCode.INTERNAL,
                                f"edge and verifier disagree: {len(self.context)} vs "
                                f"{verdict.committed} tokens, {finish} vs {verdict.finish_reason}")
        self.digest.extend(u32(kept))
        if verdict.context_digest != self.digest.digest():
            self._integrity_failure("the verifier's committed context differs from this edge's")
        if verdict.feature:
            self.client.backend.observe(self.state, verdict.feature, len(self.context))
        r = self.result
        r.token_ids.extend(kept)
        fresh = self._fresh_tokens(kept)
        fresh_logprobs = self._logprobs(kept, verdict)[len(kept) - len(fresh):]
        r.finish_reason = finish
        r.rounds += 1
        r.target_forward_passes += 1
        r.drafted += len(drafted)
        r.accepted += verdict.accepted
        r.draft_ms += draft_ms
        r.queue_ms += verdict.queue_ms
        r.verify_ms += verdict.verify_ms
        r.transport_ms += max(0.0, round_ms - verdict.queue_ms - verdict.verify_ms)
        r.round_ms.append(round_ms)
        self.client.metrics.observe_round(self.client.config.tenant, len(drafted), verdict.accepted,
                                          len(kept), draft_ms, round_ms, self.client.backend.model_name)
        if self.on_logprobs is not None and fresh_logprobs:
            self.on_logprobs(self.sid, fresh_logprobs)
        if self.on_tokens is not None and fresh:
            self.on_tokens(self.sid, fresh)

    def _logprobs(self, kept: list[int], verdict: Verdict) -> list[TokenLogprob]:
        """The kept tokens' logprobs from the verdict (recorded in the result), when asked for."""
        if self.result.logprobs is None:
            return []
        data = verdict.logprobs
        if data is None or len(data) != len(kept):
            raise SessionFailed(ErrorCode.INTERNAL, f"the verdict of round {verdict.seq} carries "
                                f"{0 if data is None else len(data)} logprobs for {len(kept)} tokens "
                                "(a verifier older than this edge ignores the request for them)")
        entries = [TokenLogprob(token, float(chosen), tuple(zip(ids.tolist(), values.tolist(), strict=True)))
                   for token, chosen, ids, values in zip(kept, data.chosen.tolist(), data.top_ids,
                                                         data.top_logprobs, strict=True)]
        del self.result.logprobs[len(self.result.token_ids) - len(kept):]  # a rewind redoes rounds
        self.result.logprobs.extend(entries)
        return entries

    def _fresh_tokens(self, kept: list[int]) -> list[int]:
        """The tokens not handed out before; after a rewind the redone ones must equal those that were."""
        done = len(self.result.token_ids) - len(kept)
        overlap = self.emitted[done:done + len(kept)]
        if overlap != kept[:len(overlap)]:
            raise SessionFailed(ErrorCode.INTERNAL, "after Redis lost committed rounds the verifier's redo "
                                f"differs from the tokens already emitted at position {done}")
        fresh = kept[len(overlap):]
        self.emitted.extend(fresh)
        return fresh


def new_seed() -> int:
    return random.SystemRandom().randrange(1 << 31)


def _u32(tokens: list[int]) -> Any:
    import numpy as np

    return np.asarray(tokens, dtype=np.uint32)


async def _quietly(awaitable: Any) -> None:
    try:
        await awaitable
    except Exception as exc:  # noqa: BLE001 - best effort on the way out
        log.warning("edge.close_failed", error=str(exc))
