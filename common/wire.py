"""Versioned msgpack wire schemas: session open, draft batch, verdict, error, session close.

Token ids travel as little-endian uint32 arrays and draft probabilities as float32 arrays
(msgpack ``bin``), never as strings. Every message carries ``v`` (schema version) and ``t``
(type). Decoding validates structure, types and size limits before any tensor work and raises
``WireError`` with a typed ``ErrorCode`` that the verifier sends back to the session.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from common.tracing import TRACEPARENT

SCHEMA_VERSION = 2
"""2: the open carries a nonce instead of a verdict key; verdicts bind the drafted tokens and the
committed context (common.integrity); opens, drafts and closes travel with a MAC beside them."""
MAX_TOP_LOGPROBS = 20  # as OpenAI's top_logprobs
LOGPROB_FLOOR = -9999.0  # a token of probability 0 (log -inf) is reported as this (JSON has no -inf)
SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
"""Session ids become part of Redis keys: no braces, spaces or control characters."""


class ErrorCode(str, enum.Enum):
    MALFORMED = "malformed"  # not msgpack, not a map, missing or mistyped fields
    UNSUPPORTED_VERSION = "unsupported_version"
    INVALID_TOKEN = "invalid_token"  # token id outside the target's vocabulary
    INVALID_DISTRIBUTION = "invalid_distribution"  # NaN/negative/empty q, draft not in support
    LIMIT_EXCEEDED = "limit_exceeded"  # gamma, prompt, support or message size over limits
    OUT_OF_ORDER = "out_of_order"  # sequence number or position does not follow the session
    UNKNOWN_SESSION = "unknown_session"
    TOKENIZER_MISMATCH = "tokenizer_mismatch"
    MODEL_MISMATCH = "model_mismatch"
    SESSION_EXPIRED = "session_expired"
    CAPACITY = "capacity"  # no verifier had KV room for the session within the admission wait
    TENANT_LIMIT = "tenant_limit"  # over the session limit (fatal) or draft-token rate (non-fatal)
    DEAD_LETTER = "dead_letter"  # a message kept failing and was moved to the dead-letter stream
    BUSY = "busy"  # the tenant's queue of waiting session opens is full: open again later
    UNAVAILABLE = "unavailable"  # Redis stayed unreachable (or lost the session) past the edge's bound
    INVALID_STATE = "invalid_state"  # a session key holds a value no verifier wrote (wrong type, bad id)
    FORBIDDEN = "forbidden"  # Redis refused a command under this client's ACL user (NOPERM)
    INTEGRITY = "integrity"  # a message failed its MAC, or a verdict verified other tokens than drafted
    INTERNAL = "internal"


class WireError(Exception):
    """A message that cannot be accepted; ``code`` is sent back to its session."""

    def __init__(self, code: ErrorCode, message: str, session_id: str | None = None):
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.session_id = session_id


@dataclass(frozen=True)
class Limits:
    """Size limits enforced while decoding, before any tensor work."""

    max_message_bytes: int = 1 << 20
    max_prompt_tokens: int = 8192
    max_new_tokens: int = 8192
    max_gamma: int = 16
    max_support: int = 256
    max_stop_tokens: int = 64
    max_id_length: int = 128
    vocab_size: int = 1 << 31  # the verifier narrows this to its model's vocabulary


def _ids_to_bytes(ids: np.ndarray | list[int]) -> bytes:
    return np.asarray(ids, dtype="<u4").tobytes()


def _bytes_to_ids(raw: Any, name: str, limit: int, vocab: int) -> np.ndarray:
    if not isinstance(raw, bytes) or len(raw) % 4:
        raise WireError(ErrorCode.MALFORMED, f"{name} must be a uint32 byte array")
    if len(raw) // 4 > limit:
        raise WireError(ErrorCode.LIMIT_EXCEEDED, f"{name} has {len(raw) // 4} ids, limit {limit}")
    ids = np.frombuffer(raw, dtype="<u4")
    if ids.size and int(ids.max()) >= vocab:
        raise WireError(ErrorCode.INVALID_TOKEN, f"{name} holds id {int(ids.max())} >= vocab {vocab}")
    return ids


@dataclass(frozen=True)
class SamplingSpec:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "seed": self.seed, "max_new_tokens": self.max_new_tokens,
            "stop_token_ids": _ids_to_bytes(list(self.stop_token_ids)),
        }

    @classmethod
    def from_wire(cls, raw: Any, limits: Limits) -> SamplingSpec:
        fields_ = _require_map(raw, "sampling")
        temperature = _number(fields_, "temperature")
        top_p = _number(fields_, "top_p")
        if not (0.0 <= temperature <= 100.0):
            raise WireError(ErrorCode.MALFORMED, f"temperature {temperature} outside [0, 100]")
        if not (0.0 < top_p <= 1.0):
            raise WireError(ErrorCode.MALFORMED, f"top_p {top_p} outside (0, 1]")
        max_new = _integer(fields_, "max_new_tokens", 1, limits.max_new_tokens)
        stops = _bytes_to_ids(fields_.get("stop_token_ids", b""), "stop_token_ids",
                              limits.max_stop_tokens, limits.vocab_size)
        return cls(
            temperature=temperature, top_p=top_p,
            top_k=_integer(fields_, "top_k", 0, 1 << 31), seed=_integer(fields_, "seed", 0, (1 << 63) - 1),
            max_new_tokens=max_new, stop_token_ids=tuple(int(t) for t in stops),
        )


@dataclass(frozen=True)
class SessionOpen:
    session_id: str
    prompt_ids: np.ndarray  # [P] uint32
    sampling: SamplingSpec
    draft_model: str
    vocab_fingerprint: str
    tenant: str = "default"
    target_model: str = ""  # the target the edge expects; empty means "whatever the pool runs"
    nonce: bytes = b""  # random per session: mixed with the secret and the id into the session's key
    logprobs: int | None = None  # None: none; n: each committed token's logprob and its top n
    trace: str = ""  # W3C traceparent of the edge's session span when tracing is on (else absent)
    features: bool = False  # verdicts carry the target's feature for the edge's feature draft
    type_: str = field(default="open", init=False)


@dataclass(frozen=True)
class DraftBatch:
    """``gamma`` drafted tokens for positions ``start .. start + gamma - 1``.

    For sampled sessions ``support_ids``/``support_probs`` hold, per position, the exact sparse
    distribution the edge sampled from (``support_sizes[j]`` entries each, concatenated).
    Greedy sessions send empty support arrays.
    """

    session_id: str
    seq: int
    start: int
    token_ids: np.ndarray  # [gamma] uint32
    support_sizes: np.ndarray  # [gamma] uint16, or [0] for greedy
    support_ids: np.ndarray  # [sum(support_sizes)] uint32
    support_probs: np.ndarray  # [sum(support_sizes)] float32
    sent_at: float = 0.0  # edge wall clock, seconds
    draft_ms: float = 0.0  # edge time spent drafting this batch
    type_: str = field(default="draft", init=False)

    @property
    def gamma(self) -> int:
        return int(self.token_ids.size)


@dataclass(frozen=True)
class TokenLogprobs:
    """The target's log-probabilities of a verdict's committed tokens, from the pass that committed
    them: log-softmax of the raw logits (temperature 1, no top-k/top-p), whatever the session samples
    with. Row ``i`` is committed token ``i``: its own logprob and the ``n`` most likely tokens."""

    chosen: np.ndarray  # [k] float32
    top_ids: np.ndarray  # [k, n] uint32, most likely first
    top_logprobs: np.ndarray  # [k, n] float32

    def __len__(self) -> int:
        return int(self.chosen.size)

    def head(self, count: int) -> TokenLogprobs:
        """The first ``count`` tokens' rows (the tokens the stop rules kept)."""
        return TokenLogprobs(self.chosen[:count], self.top_ids[:count], self.top_logprobs[:count])


@dataclass(frozen=True)
class Verdict:
    session_id: str
    seq: int
    accepted: int  # number of drafted tokens accepted (a prefix)
    token: int  # the recovered token after a rejection, or the bonus token
    committed: int  # total committed tokens (prompt + generated) after this verdict
    finish_reason: str | None = None  # "stop" | "length" | None
    queue_ms: float = 0.0  # from the draft's send to the start of its batch
    verify_ms: float = 0.0  # the batch's forward pass and sampling
    batch_size: int = 1
    worker_id: str = ""
    pool_load: float = 0.0  # the verifier's load: >= 1 means its batch or KV budget binds
    drafted: bytes = b""  # common.integrity.draft_digest of the draft this verdict verified
    context_digest: bytes = b""  # digest of the committed context after this verdict
    logprobs: TokenLogprobs | None = None  # only for sessions that asked (SessionOpen.logprobs)
    feature: bytes = b""  # float16 [H]: the target's final hidden state at the position that produced
    # ``token`` (common.feature_draft), only for sessions that asked (SessionOpen.features)
    type_: str = field(default="verdict", init=False)


@dataclass(frozen=True)
class ErrorMessage:
    session_id: str
    code: ErrorCode
    message: str
    seq: int = -1
    fatal: bool = True  # the session is over
    retry_after_s: float = 0.0  # non-fatal throttling: about when the held draft goes on (wire "retry")
    committed: int = 0  # out_of_order notices: the verifier's committed context length (0: unknown)
    type_: str = field(default="error", init=False)


@dataclass(frozen=True)
class SessionClose:
    session_id: str
    reason: str = "done"
    type_: str = field(default="close", init=False)


Message = SessionOpen | DraftBatch | Verdict | ErrorMessage | SessionClose


# ---------------------------------------------------------------- encoding


def encode(message: Message) -> bytes:
    """Encode any message as a msgpack map with ``v`` and ``t``."""
    body: dict[str, Any] = {"v": SCHEMA_VERSION, "t": message.type_, "sid": message.session_id}
    body.update(_BODIES[message.type_](message))
    return msgpack.packb(body, use_bin_type=True)


def _open_body(message: Any) -> dict[str, Any]:
    body: dict[str, Any] = dict(
        prompt=_ids_to_bytes(message.prompt_ids), sampling=message.sampling.to_wire(),
        draft_model=message.draft_model, target_model=message.target_model,
        vocab=message.vocab_fingerprint, tenant=message.tenant, nonce=message.nonce,
    )
    if message.logprobs is not None:  # absent by default: no cost for sessions that do not ask
        body["logprobs"] = message.logprobs
    if message.trace:
        body["trace"] = message.trace
    if message.features:
        body["feat"] = True
    return body


def _draft_body(message: Any) -> dict[str, Any]:
    return dict(
        seq=message.seq, start=message.start, tokens=_ids_to_bytes(message.token_ids),
        sizes=np.asarray(message.support_sizes, dtype="<u2").tobytes(),
        sup_ids=_ids_to_bytes(message.support_ids),
        sup_probs=np.asarray(message.support_probs, dtype="<f4").tobytes(),
        sent_at=message.sent_at, draft_ms=message.draft_ms,
    )


def _verdict_body(message: Any) -> dict[str, Any]:
    body: dict[str, Any] = dict(
        seq=message.seq, accepted=message.accepted, token=message.token,
        committed=message.committed, finish=message.finish_reason, queue_ms=message.queue_ms,
        verify_ms=message.verify_ms, batch=message.batch_size, worker=message.worker_id,
        load=message.pool_load, dh=message.drafted, ch=message.context_digest,
    )
    if message.logprobs is not None:
        body.update(_logprobs_to_wire(message.logprobs))
    if message.feature:
        body["f"] = message.feature
    return body


def _error_body(message: Any) -> dict[str, Any]:
    return dict(seq=message.seq, code=message.code.value, message=message.message,
                fatal=message.fatal, retry=message.retry_after_s, committed=message.committed)


_BODIES: dict[str, Callable[[Any], dict[str, Any]]] = {
    "open": _open_body, "draft": _draft_body, "verdict": _verdict_body, "error": _error_body,
    "close": lambda message: {"reason": message.reason},
}


# ---------------------------------------------------------------- decoding


def peek_session_id(raw: bytes) -> str | None:
    """Best effort: the session id of a message that may fail to decode, for error routing."""
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception:  # noqa: BLE001 - any failure just means "cannot tell"
        return None
    return _safe_sid(body) if isinstance(body, dict) else None


def decode(raw: bytes, limits: Limits = Limits()) -> Message:
    """Decode and validate one message; raises ``WireError`` on anything unacceptable."""
    if not isinstance(raw, bytes | bytearray):
        raise WireError(ErrorCode.MALFORMED, "payload is not bytes")
    if len(raw) > limits.max_message_bytes:
        raise WireError(ErrorCode.LIMIT_EXCEEDED,
                        f"message of {len(raw)} bytes exceeds {limits.max_message_bytes}")
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:
        raise WireError(ErrorCode.MALFORMED, f"not valid msgpack: {type(exc).__name__}") from exc
    body = _require_map(body, "message")
    version = body.get("v")
    if version != SCHEMA_VERSION:
        raise WireError(ErrorCode.UNSUPPORTED_VERSION,
                        f"schema version {version!r} is not supported (expected {SCHEMA_VERSION}): run the "
                        "same specd release on edges and verifiers",
                        session_id=_safe_sid(body))
    session_id = _string(body, "sid", limits.max_id_length)
    decoder = _DECODERS.get(_string(body, "t", 16))
    if decoder is None:
        raise WireError(ErrorCode.MALFORMED, f"unknown message type {body.get('t')!r}", session_id)
    try:
        return decoder(body, session_id, limits)
    except WireError as exc:
        exc.session_id = session_id
        raise


def _decode_open(body: dict[str, Any], sid: str, limits: Limits) -> SessionOpen:
    prompt = _bytes_to_ids(body.get("prompt"), "prompt", limits.max_prompt_tokens, limits.vocab_size)
    if prompt.size == 0:
        raise WireError(ErrorCode.MALFORMED, "prompt is empty")
    return SessionOpen(
        session_id=sid, prompt_ids=prompt, sampling=SamplingSpec.from_wire(body.get("sampling"), limits),
        draft_model=_string(body, "draft_model", 512), target_model=_string(body, "target_model", 512),
        vocab_fingerprint=_string(body, "vocab", 128), tenant=_string(body, "tenant", limits.max_id_length),
        nonce=_short_bytes(body, "nonce", 64), logprobs=_top_count(body), trace=_trace(body),
        features=body.get("feat") is True,
    )


def _top_count(body: dict[str, Any]) -> int | None:
    if body.get("logprobs") is None:  # absent from older edges, and from sessions that do not ask
        return None
    return _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)


def _logprobs_to_wire(logprobs: TokenLogprobs) -> dict[str, bytes]:
    return {"lp": np.asarray(logprobs.chosen, dtype="<f4").tobytes(),
            "lp_ids": _ids_to_bytes(np.asarray(logprobs.top_ids).reshape(-1)),
            "lp_top": np.asarray(logprobs.top_logprobs, dtype="<f4").reshape(-1).tobytes()}


def _logprobs_from_wire(body: dict[str, Any], limits: Limits) -> TokenLogprobs | None:
    """A verdict's logprobs (absent: none); at most one row per token a round can commit."""
    if "lp" not in body:
        return None
    chosen = _floats(body.get("lp"), "lp", limits.max_gamma + 1)
    rows = max(chosen.size, 1)
    top_ids = _bytes_to_ids(body.get("lp_ids"), "lp_ids", rows * MAX_TOP_LOGPROBS, limits.vocab_size)
    top = _floats(body.get("lp_top"), "lp_top", rows * MAX_TOP_LOGPROBS)
    if top.size != top_ids.size or top.size % rows or (top.size and not chosen.size):
        raise WireError(ErrorCode.MALFORMED, "lp_ids and lp_top must hold n entries per token of lp")
    n = top.size // rows
    return TokenLogprobs(chosen, top_ids.reshape(chosen.size, n), top.reshape(chosen.size, n))


def _floats(raw: Any, name: str, limit: int) -> np.ndarray:
    if not isinstance(raw, bytes) or len(raw) % 4 or len(raw) // 4 > limit:
        raise WireError(ErrorCode.MALFORMED, f"{name} must be a float32 byte array of at most {limit}")
    values = np.frombuffer(raw, dtype="<f4")
    if not np.all(np.isfinite(values)):
        raise WireError(ErrorCode.MALFORMED, f"{name} holds a value that is not finite")
    return values


def _trace(body: dict[str, Any]) -> str:
    """The open's trace context; an invalid one is ignored (as W3C trace context asks), not an error."""
    value = body.get("trace", "")
    return value if isinstance(value, str) and TRACEPARENT.fullmatch(value) else ""


def _short_bytes(body: dict[str, Any], name: str, limit: int) -> bytes:
    value = body.get(name, b"")
    if not isinstance(value, bytes) or len(value) > limit:
        raise WireError(ErrorCode.MALFORMED, f"{name} must be a byte string of at most {limit} bytes")
    return value


def _decode_draft(body: dict[str, Any], sid: str, limits: Limits) -> DraftBatch:
    tokens = _bytes_to_ids(body.get("tokens"), "tokens", limits.max_gamma, limits.vocab_size)
    raw_sizes = body.get("sizes", b"")
    if not isinstance(raw_sizes, bytes) or len(raw_sizes) % 2:
        raise WireError(ErrorCode.MALFORMED, "sizes must be a uint16 byte array")
    sizes = np.frombuffer(raw_sizes, dtype="<u2")
    if sizes.size not in (0, tokens.size):
        raise WireError(ErrorCode.MALFORMED, f"{sizes.size} support sizes for {tokens.size} tokens")
    if sizes.size and (int(sizes.max()) > limits.max_support or int(sizes.min()) == 0):
        raise WireError(ErrorCode.LIMIT_EXCEEDED,
                        f"support sizes must be in 1..{limits.max_support}")
    total = int(sizes.sum()) if sizes.size else 0
    support_ids = _bytes_to_ids(body.get("sup_ids", b""), "sup_ids", total, limits.vocab_size)
    raw_probs = body.get("sup_probs", b"")
    if not isinstance(raw_probs, bytes) or len(raw_probs) != 4 * total or support_ids.size != total:
        raise WireError(ErrorCode.MALFORMED, "support arrays do not match the support sizes")
    probs = np.frombuffer(raw_probs, dtype="<f4")
    _check_distributions(tokens, sizes, support_ids, probs)
    return DraftBatch(
        session_id=sid, seq=_integer(body, "seq", 0, 1 << 62),
        start=_integer(body, "start", 1, 1 << 40), token_ids=tokens, support_sizes=sizes,
        support_ids=support_ids, support_probs=probs,
        sent_at=_number(body, "sent_at", 0.0), draft_ms=_number(body, "draft_ms", 0.0),
    )


def _check_distributions(
    tokens: np.ndarray, sizes: np.ndarray, support_ids: np.ndarray, probs: np.ndarray
) -> None:
    if not sizes.size:
        return
    if not np.all(np.isfinite(probs)) or np.any(probs <= 0):
        raise WireError(ErrorCode.INVALID_DISTRIBUTION, "support probabilities must be finite and > 0")
    offsets = np.concatenate(([0], np.cumsum(sizes.astype(np.int64))))
    for j, token in enumerate(tokens):
        ids = support_ids[offsets[j]: offsets[j + 1]]
        if np.unique(ids).size != ids.size:
            raise WireError(ErrorCode.INVALID_DISTRIBUTION, f"position {j}: repeated support ids")
        if token not in ids:
            raise WireError(ErrorCode.INVALID_DISTRIBUTION,
                            f"position {j}: drafted token {int(token)} is outside its support")


def _decode_verdict(body: dict[str, Any], sid: str, limits: Limits) -> Verdict:
    finish = body.get("finish")
    if finish not in (None, "stop", "length"):
        raise WireError(ErrorCode.MALFORMED, f"unknown finish reason {finish!r}")
    return Verdict(
        session_id=sid, seq=_integer(body, "seq", 0, 1 << 62),
        accepted=_integer(body, "accepted", 0, limits.max_gamma),
        token=_integer(body, "token", 0, limits.vocab_size - 1),
        committed=_integer(body, "committed", 1, 1 << 40), finish_reason=finish,
        queue_ms=_number(body, "queue_ms", 0.0), verify_ms=_number(body, "verify_ms", 0.0),
        batch_size=_integer(body, "batch", 0, 1 << 20), worker_id=_string(body, "worker", 128),
        pool_load=_number(body, "load", 0.0),  # absent in verdicts of older verifiers
        drafted=_short_bytes(body, "dh", 32), context_digest=_short_bytes(body, "ch", 32),
        logprobs=_logprobs_from_wire(body, limits), feature=_feature(body),
    )


MAX_FEATURE_BYTES = 2 * 16384  # float16, hidden sizes up to 16,384


def _feature(body: dict[str, Any]) -> bytes:
    """A verdict's feature (absent: none): an even number of bytes, at most MAX_FEATURE_BYTES."""
    value = _short_bytes(body, "f", MAX_FEATURE_BYTES)
    if len(value) % 2:
        raise WireError(ErrorCode.MALFORMED, "f must be a float16 byte array")
    return value


def _decode_error(body: dict[str, Any], sid: str, limits: Limits) -> ErrorMessage:
    code_text = _string(body, "code", 64)
    try:
        code = ErrorCode(code_text)
    except ValueError:
        code = ErrorCode.INTERNAL
    return ErrorMessage(
        session_id=sid, code=code, message=_string(body, "message", 4096),
        seq=_integer(body, "seq", -1, 1 << 62), fatal=bool(body.get("fatal", True)),
        retry_after_s=max(0.0, _number(body, "retry", 0.0)),  # absent from older verifiers
        committed=_integer({"c": body.get("committed", 0)}, "c", 0, 1 << 40),
    )


def _decode_close(body: dict[str, Any], sid: str, limits: Limits) -> SessionClose:
    return SessionClose(session_id=sid, reason=_string(body, "reason", 256))


_DECODERS: dict[str, Callable[[dict[str, Any], str, Limits], Message]] = {
    "open": _decode_open, "draft": _decode_draft, "verdict": _decode_verdict,
    "error": _decode_error, "close": _decode_close,
}


# ---------------------------------------------------------------- field helpers


def _require_map(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WireError(ErrorCode.MALFORMED, f"{name} must be a map")
    return value


def _safe_sid(body: dict[str, Any]) -> str | None:
    sid = body.get("sid")
    return sid if isinstance(sid, str) and SESSION_ID_PATTERN.fullmatch(sid) else None


def _string(body: dict[str, Any], key: str, max_length: int) -> str:
    value = body.get(key, "")
    if not isinstance(value, str) or len(value) > max_length:
        raise WireError(ErrorCode.MALFORMED, f"{key} must be a string of at most {max_length} chars")
    if key == "sid" and not SESSION_ID_PATTERN.fullmatch(value):
        raise WireError(ErrorCode.MALFORMED, "sid must match [A-Za-z0-9_.:-]{1,128}")
    return value


def _integer(body: dict[str, Any], key: str, low: int, high: int) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not (low <= value <= high):
        raise WireError(ErrorCode.MALFORMED, f"{key} must be an integer in [{low}, {high}]")
    return value


def _number(body: dict[str, Any], key: str, default: float | None = None) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise WireError(ErrorCode.MALFORMED, f"{key} must be a finite number")
    return float(value)
