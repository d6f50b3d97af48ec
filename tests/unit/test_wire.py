"""Wire schemas: round trips and typed errors for malformed or hostile input."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from common.wire import (
    SCHEMA_VERSION,
    DraftBatch,
    ErrorCode,
    ErrorMessage,
    Limits,
    SamplingSpec,
    SessionClose,
    SessionOpen,
    Verdict,
    WireError,
    decode,
    encode,
    peek_session_id,
)

LIMITS = Limits(vocab_size=1000)


def _draft(**overrides) -> DraftBatch:
    fields = dict(
        session_id="s1", seq=3, start=10, token_ids=np.array([5, 7], np.uint32),
        support_sizes=np.array([2, 1], np.uint16), support_ids=np.array([5, 9, 7], np.uint32),
        support_probs=np.array([0.6, 0.4, 1.0], np.float32), sent_at=1.5, draft_ms=2.0,
    )
    fields.update(overrides)
    return DraftBatch(**fields)


def _raw(message) -> dict:
    return msgpack.unpackb(encode(message), raw=False)


def test_round_trips() -> None:
    opened = SessionOpen("s1", np.array([1, 2, 3], np.uint32),
                         SamplingSpec(0.7, 0.9, 5, 42, 16, (0, 2)), "draft", "fp", "tenant-a", "t")
    decoded = decode(encode(opened), LIMITS)
    assert isinstance(decoded, SessionOpen)
    assert decoded.prompt_ids.tolist() == [1, 2, 3] and decoded.sampling == opened.sampling
    draft = decode(encode(_draft()), LIMITS)
    assert isinstance(draft, DraftBatch) and draft.token_ids.tolist() == [5, 7]
    assert draft.support_probs.tolist() == pytest.approx([0.6, 0.4, 1.0])
    verdict = Verdict("s1", 3, 2, 9, 13, "stop", 1.0, 2.0, 4, "w")
    assert decode(encode(verdict), LIMITS) == verdict
    error = ErrorMessage("s1", ErrorCode.INVALID_TOKEN, "bad", 3, False)
    assert decode(encode(error), LIMITS) == error
    assert decode(encode(SessionClose("s1", "done")), LIMITS) == SessionClose("s1", "done")


def test_token_ids_travel_as_uint32_bytes() -> None:
    body = _raw(_draft())
    assert isinstance(body["tokens"], bytes) and len(body["tokens"]) == 8


@pytest.mark.parametrize("payload, code", [
    (b"\xc1not msgpack", ErrorCode.MALFORMED),
    (msgpack.packb([1, 2, 3]), ErrorCode.MALFORMED),
    (msgpack.packb({"v": 99, "t": "draft", "sid": "s1"}), ErrorCode.UNSUPPORTED_VERSION),
    (msgpack.packb({"v": SCHEMA_VERSION, "t": "nope", "sid": "s1"}), ErrorCode.MALFORMED),
    (msgpack.packb({"v": SCHEMA_VERSION, "t": "draft", "sid": "bad}id"}), ErrorCode.MALFORMED),
    (b"\x00" * (Limits().max_message_bytes + 1), ErrorCode.LIMIT_EXCEEDED),
])
def test_structural_errors(payload: bytes, code: ErrorCode) -> None:
    with pytest.raises(WireError) as info:
        decode(payload, LIMITS)
    assert info.value.code is code


def _mutated_draft(**changes) -> bytes:
    body = _raw(_draft())
    body.update(changes)
    return msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize("changes, code", [
    ({"tokens": np.array([5, 5000], "<u4").tobytes()}, ErrorCode.INVALID_TOKEN),
    ({"sup_probs": np.array([np.nan, 0.4, 1.0], "<f4").tobytes()}, ErrorCode.INVALID_DISTRIBUTION),
    ({"sup_probs": np.array([-0.1, 0.4, 1.0], "<f4").tobytes()}, ErrorCode.INVALID_DISTRIBUTION),
    ({"sup_ids": np.array([6, 9, 7], "<u4").tobytes()}, ErrorCode.INVALID_DISTRIBUTION),
    ({"sup_ids": np.array([5, 5, 7], "<u4").tobytes()}, ErrorCode.INVALID_DISTRIBUTION),
    ({"sizes": np.array([2], "<u2").tobytes()}, ErrorCode.MALFORMED),
    ({"sup_probs": b"\x00\x00"}, ErrorCode.MALFORMED),
    ({"tokens": np.arange(17, dtype="<u4").tobytes()}, ErrorCode.LIMIT_EXCEEDED),
    ({"seq": -1}, ErrorCode.MALFORMED),
    ({"seq": "3"}, ErrorCode.MALFORMED),
    ({"sent_at": float("inf")}, ErrorCode.MALFORMED),
    ({"tokens": b"abc"}, ErrorCode.MALFORMED),
])
def test_draft_validation(changes: dict, code: ErrorCode) -> None:
    with pytest.raises(WireError) as info:
        decode(_mutated_draft(**changes), LIMITS)
    assert info.value.code is code
    assert info.value.session_id == "s1"  # the error can be routed back to its session


def test_support_over_limit() -> None:
    with pytest.raises(WireError) as info:
        decode(encode(_draft()), Limits(vocab_size=1000, max_support=1))
    assert info.value.code is ErrorCode.LIMIT_EXCEEDED


def test_prompt_limits_and_empty_prompt() -> None:
    spec = SamplingSpec(max_new_tokens=4)
    long_prompt = SessionOpen("s", np.arange(20, dtype=np.uint32), spec, "d", "f")
    with pytest.raises(WireError, match="prompt"):
        decode(encode(long_prompt), Limits(vocab_size=1000, max_prompt_tokens=10))
    with pytest.raises(WireError, match="empty"):
        decode(encode(SessionOpen("s", np.zeros(0, np.uint32), spec, "d", "f")), LIMITS)


def test_peek_session_id_is_best_effort() -> None:
    assert peek_session_id(msgpack.packb({"v": 7, "sid": "abc"})) == "abc"
    assert peek_session_id(b"garbage") is None
    assert peek_session_id(msgpack.packb({"sid": "a b"})) is None


def test_logprobs_travel_only_when_asked_and_round_trip() -> None:
    from common.wire import TokenLogprobs

    plain = SessionOpen("s1", np.array([1, 2], np.uint32), SamplingSpec(), "d", "fp")
    assert "logprobs" not in _raw(plain) and decode(encode(plain), LIMITS).logprobs is None
    asking = SessionOpen("s1", np.array([1, 2], np.uint32), SamplingSpec(), "d", "fp", logprobs=0)
    assert decode(encode(asking), LIMITS).logprobs == 0
    bare = Verdict("s1", 3, 1, 9, 13)
    assert not {"lp", "lp_ids", "lp_top"} & set(_raw(bare)) and decode(encode(bare), LIMITS).logprobs is None
    data = TokenLogprobs(np.array([-0.5, -1.25], np.float32), np.array([[4, 7], [9, 1]], np.uint32),
                         np.array([[-0.5, -2.0], [-1.25, -1.5]], np.float32))
    got = decode(encode(Verdict("s1", 3, 1, 9, 13, logprobs=data)), LIMITS).logprobs
    assert got is not None and got.chosen.tolist() == [-0.5, -1.25]
    assert got.top_ids.tolist() == [[4, 7], [9, 1]]
    assert got.top_logprobs.tolist() == [[-0.5, -2.0], [-1.25, -1.5]]
    none_top = TokenLogprobs(np.array([-0.5], np.float32), np.zeros((1, 0), np.uint32),
                             np.zeros((1, 0), np.float32))
    got = decode(encode(Verdict("s1", 3, 0, 9, 13, logprobs=none_top)), LIMITS).logprobs
    assert got is not None and got.top_ids.shape == (1, 0) and got.head(1).chosen.tolist() == [-0.5]


@pytest.mark.parametrize("changes", [
    {"lp": np.array([np.nan], "<f4").tobytes()},  # not finite
    {"lp_ids": np.array([1, 2, 3], "<u4").tobytes()},  # ids and values of different lengths
    {"lp_ids": np.array([1000], "<u4").tobytes(), "lp_top": np.array([-1.0], "<f4").tobytes()},  # id
    {"lp": b"\x00\x00\x80"},  # not float32
    {"lp": np.zeros(18, "<f4").tobytes()},  # more rows than a round can commit (gamma 16 + 1)
])
def test_verdict_logprobs_are_validated(changes: dict) -> None:
    body = _raw(Verdict("s1", 3, 1, 9, 13))
    body.update({"lp": np.array([-0.5], "<f4").tobytes(), "lp_ids": np.array([4], "<u4").tobytes(),
                 "lp_top": np.array([-0.5], "<f4").tobytes()})
    assert decode(msgpack.packb(body), LIMITS).logprobs is not None  # the unchanged body is valid
    body.update(changes)
    with pytest.raises(WireError) as caught:
        decode(msgpack.packb(body), LIMITS)
    assert caught.value.code in (ErrorCode.MALFORMED, ErrorCode.INVALID_TOKEN)


@pytest.mark.parametrize("value", [21, -1, 2.5, "5"])
def test_open_logprobs_bounded_as_openai_top_logprobs(value) -> None:
    body = _raw(SessionOpen("s1", np.array([1, 2], np.uint32), SamplingSpec(), "d", "fp"))
    body["logprobs"] = value
    with pytest.raises(WireError) as caught:
        decode(msgpack.packb(body), LIMITS)
    assert caught.value.code is ErrorCode.MALFORMED
