"""A verifier's view of one session: committed context, sequence numbers, cache, stats."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from common.integrity import ContextDigest, mac_ok, u32
from common.sampling import SamplingParams, apply_stop_rules
from common.wire import DraftBatch, ErrorCode, SessionOpen, Verdict, WireError, decode
from verifier_worker.engine import Draft, VerifyOutcome, VerifyRequest
from verifier_worker.kv import SessionKV


@dataclass
class PendingDraft:
    entry_id: str
    draft: DraftBatch
    received_at: float


DEFAULT_DRAFT_ROOM = 16


def kv_reserve(prompt_tokens: int, max_new_tokens: int, draft_room: int) -> int:
    """KV positions a session can fill: its prompt, its new tokens and one round's draft."""
    return prompt_tokens + max_new_tokens + draft_room


@dataclass
class VerifierSession:
    session_id: str
    tenant: str
    params: SamplingParams
    stop_token_ids: frozenset[int]
    max_new_tokens: int
    context: list[int]
    prompt_len: int
    next_seq: int = 0
    kv: SessionKV = field(default_factory=SessionKV)
    queue: deque[PendingDraft] = field(default_factory=deque)
    last_verdict: bytes | None = None
    finished: str | None = None
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    opened_at: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)
    adopted_idle: bool = False  # adopted and no draft since: ended after pool.adopted_idle_s
    failures: int = 0  # failed forward passes holding this session's head draft
    evicted: bool = False  # KV freed to make room; recomputed from the context if it returns
    solo: bool = False  # after a failed pass: verify alone, so a poison draft cannot sink others
    draft_room: int = DEFAULT_DRAFT_ROOM  # the largest draft a round may carry (limits.max_gamma)
    lease: str = ""  # ``worker/epoch``: every write for the session is fenced by it
    key: bytes = b""  # the session's key (common.integrity): MACs of drafts in, verdicts out
    open_raw: bytes = b""  # the open message, to rewrite the meta key if Redis lost it
    open_tag: bytes = b""  # the edge's MAC of it, saved beside it
    digest: ContextDigest = field(default_factory=ContextDigest)  # of ``context``: each verdict carries it
    forged: int = 0  # draft-stream entries that failed their MAC
    forged_told: float = -1e9  # when the edge was last told of one (monotonic)
    stored: int = 0  # tokens of the context known to be in Redis ({sid}:tokens)
    repair: bool = False  # the next commit rewrites the whole context (Redis lost some of it)
    logprobs: int | None = None  # the open's: verdicts carry the committed tokens' logprobs
    trace: str = ""  # the edge's session span (W3C traceparent) when it traces; rounds join it
    features: bool = False  # the open's: verdicts carry the target's feature (common.feature_draft)

    @classmethod
    def from_open(cls, message: SessionOpen, draft_room: int = 0) -> VerifierSession:
        spec = message.sampling
        return cls(
            draft_room=draft_room or DEFAULT_DRAFT_ROOM,
            session_id=message.session_id, tenant=message.tenant,
            params=SamplingParams.of(spec),
            stop_token_ids=frozenset(spec.stop_token_ids), max_new_tokens=spec.max_new_tokens,
            context=[int(t) for t in message.prompt_ids], prompt_len=int(message.prompt_ids.size),
            digest=ContextDigest(u32(message.prompt_ids)), repair=True, logprobs=message.logprobs,
            trace=message.trace, features=message.features,
        )

    @classmethod
    def restore(cls, message: SessionOpen, state: dict[bytes, bytes], tokens: bytes | None, key: bytes,
                draft_room: int = 0) -> VerifierSession:
        """Adopt a session from its open message, its committed tokens and last round (empty KV).

        Redis' copy is trusted only as far as the last verdict's MAC (under the session's key)
        vouches for it: the verdict names the committed context's length and digest, and its seq.
        Anything else (lost, or written by someone else) restarts the session from its prompt, and
        the edge resumes from there (an ``out_of_order`` notice), its redone tokens checked
        against those it emitted. The engine feeds ``context[kv.length:]``, so the first pass after
        adoption recomputes the whole cache from the committed tokens.
        """
        session = cls.from_open(message, draft_room)
        session.key = key
        verdict = trusted_verdict(key, state, tokens)
        if tokens and verdict is not None:
            session.context = np.frombuffer(tokens, dtype="<u4").astype(int).tolist()
            session.next_seq = verdict.seq + 1
            session.last_verdict = state[b"last_verdict"]
            session.digest = ContextDigest(tokens)
            session.stored = len(session.context)
        session.repair = not session.stored  # rewrite whatever Redis holds from this worker's memory
        return session

    @property
    def reserve(self) -> int:
        """KV tokens this session counts against the budget: the blocks it holds (paged KV grows
        with use), or its first pass's need while it holds none."""
        return self.kv.size or kv_reserve(len(self.context), 0, self.draft_room)

    @property
    def generated(self) -> int:
        return len(self.context) - self.prompt_len

    def check_draft(self, draft: DraftBatch) -> None:
        """Reject a draft that does not continue this session (the caller handles duplicates)."""
        if draft.seq != self.next_seq:
            raise WireError(ErrorCode.OUT_OF_ORDER,
                            f"draft seq {draft.seq}, expected {self.next_seq}", self.session_id)
        if draft.start != len(self.context):
            raise WireError(ErrorCode.OUT_OF_ORDER,
                            f"draft starts at {draft.start}, context has {len(self.context)} tokens",
                            self.session_id)
        if not self.params.greedy and draft.gamma and not draft.support_sizes.size:
            raise WireError(ErrorCode.INVALID_DISTRIBUTION,
                            "a sampled session must send its draft distributions", self.session_id)

    def request(self, pending: PendingDraft) -> VerifyRequest:
        draft = pending.draft
        sizes = draft.support_sizes if not self.params.greedy else np.zeros(0, np.uint16)
        return VerifyRequest(
            kv=self.kv, context=self.context, seq=draft.seq, params=self.params,
            draft=Draft(draft.token_ids, sizes, draft.support_ids, draft.support_probs),
            logprobs=self.logprobs, feature=self.features,
        )

    def input_tokens(self, pending: PendingDraft) -> int:
        """Tokens this session adds to a forward pass: uncached context plus drafts."""
        return len(self.context) - self.kv.length + pending.draft.gamma

    def commit(self, draft: DraftBatch, outcome: VerifyOutcome) -> tuple[int, str | None]:
        """Append the round's tokens (cut by the stop rules); returns (kept count, finish)."""
        new_tokens = [*draft.token_ids[:outcome.accepted].tolist(), outcome.token]
        kept, finish = apply_stop_rules(new_tokens, self.generated, self.stop_token_ids,
                                        self.max_new_tokens)
        self.context.extend(kept)
        self.digest.extend(u32(kept))
        self.next_seq = draft.seq + 1
        self.rounds += 1
        self.drafted += draft.gamma
        self.accepted += outcome.accepted
        self.finished = finish
        return len(kept), finish


def trusted_verdict(key: bytes, state: dict[bytes, bytes], tokens: bytes | None) -> Verdict | None:
    """The session's last verdict from the state hash, if its MAC verifies and it vouches for ``tokens``."""
    raw, tag = state.get(b"last_verdict"), state.get(b"last_mac")
    if not tokens or not raw or not mac_ok(key, raw, tag):
        return None
    try:
        verdict = decode(raw)
    except WireError:
        return None
    if (not isinstance(verdict, Verdict) or verdict.committed * 4 != len(tokens)
            or verdict.context_digest != ContextDigest(tokens).digest()):
        return None
    return verdict
