"""Session keys, MACs and digests (common.integrity); what the edge and an adopting verifier trust."""

from __future__ import annotations

import fakeredis
import numpy as np
import pytest

from broker.streams import Broker, RoundResult
from common.integrity import ContextDigest, draft_digest, mac, mac_ok, session_key, u32
from common.wire import ErrorCode, ErrorMessage, SamplingSpec, SessionOpen, Verdict, encode
from edge_worker.client import EdgeClient, EdgeConfig, SessionFailed, _EdgeSession
from verifier_worker.session import VerifierSession, trusted_verdict

PROMPT = [1, 2, 3]


def test_the_session_key_needs_the_secret_the_session_and_its_nonce() -> None:
    key = session_key("s3cret", "acme.1", b"n" * 32)
    assert len(key) == 32 and key == session_key("s3cret", "acme.1", b"n" * 32)
    others = {session_key("other", "acme.1", b"n" * 32), session_key("s3cret", "acme.2", b"n" * 32),
              session_key("s3cret", "acme.1", b"m" * 32), session_key("", "acme.1", b"n" * 32), b"n" * 32}
    assert key not in others and len(others) == 5
    tag = mac(key, b"payload")
    assert mac_ok(key, b"payload", tag) and not mac_ok(key, b"payloaD", tag)
    assert not mac_ok(key, b"payload", None) and not any(mac_ok(k, b"payload", tag) for k in others)


def test_the_draft_digest_binds_the_tokens_and_their_position() -> None:
    digest = draft_digest(10, u32([5, 6]))
    assert digest == draft_digest(10, u32(np.asarray([5, 6], np.uint32)))
    assert digest not in {draft_digest(11, u32([5, 6])), draft_digest(10, u32([6, 5])),
                          draft_digest(10, u32([5]))}
    running = ContextDigest(u32([1, 2]))
    running.extend(u32([3]))
    assert running.digest() == ContextDigest(u32([1, 2, 3])).digest()


def _state(key: bytes, context: list[int], seq: int) -> tuple[dict[bytes, bytes], bytes]:
    """The state hash and tokens a verifier's commit leaves in Redis after round ``seq``."""
    digest = ContextDigest(u32(context)).digest()
    verdict = encode(Verdict("s", seq, 1, 9, len(context), context_digest=digest))
    state = {b"next_seq": str(seq + 1).encode(), b"last_verdict": verdict, b"last_mac": mac(key, verdict)}
    return state, u32(context)


def test_an_adopting_verifier_trusts_only_a_context_its_last_verdict_vouches_for() -> None:
    key = session_key("", "s", b"n")
    opened = SessionOpen("s", np.asarray(PROMPT, np.uint32), SamplingSpec(), "d", "f", nonce=b"n")
    state, tokens = _state(key, [*PROMPT, 7, 9], seq=0)
    assert trusted_verdict(key, state, tokens) is not None
    adopted = VerifierSession.restore(opened, state, tokens, key)
    assert adopted.context == [*PROMPT, 7, 9] and adopted.next_seq == 1 and not adopted.repair
    assert adopted.digest.digest() == ContextDigest(tokens).digest()

    tampered = [u32([*PROMPT, 7, 3]), u32([*PROMPT, 7]), u32([*PROMPT, 7, 9, 9]), b""]  # same length, ...
    forged_state = {**state, b"last_mac": mac(session_key("", "s", b""), state[b"last_verdict"])}
    wrong_seq = {**state, b"next_seq": b"5"}  # ignored: the verdict's own seq counts
    for bad_state, bad_tokens in [(state, t) for t in tampered] + [(forged_state, tokens), ({}, tokens)]:
        assert trusted_verdict(key, bad_state, bad_tokens) is None
        restarted = VerifierSession.restore(opened, bad_state, bad_tokens, key)
        assert restarted.context == PROMPT and restarted.next_seq == 0 and restarted.repair
        assert restarted.last_verdict is None and restarted.stored == 0
    assert VerifierSession.restore(opened, wrong_seq, tokens, key).next_seq == 1


class _NoDraft:
    def new_state(self) -> None:
        return None


async def test_the_edge_never_applies_a_verdict_that_verified_other_tokens() -> None:
    broker = Broker(fakeredis.FakeAsyncRedis(), prefix="t")
    client = EdgeClient(_NoDraft(), broker, EdgeConfig(verdict_timeout_s=2.0))  # type: ignore[arg-type]
    session = _EdgeSession(client, PROMPT, SamplingSpec(max_new_tokens=10), None, "s")
    session.bound = draft_digest(len(PROMPT), u32([7, 8]))  # what this edge drafted for seq 0

    async def publish(message: Verdict | ErrorMessage) -> None:
        payload = encode(message)
        await broker.publish_round([RoundResult("s", payload, [], mac=mac(session.key, payload))])

    await publish(ErrorMessage("s", ErrorCode.INTEGRITY, "1 forged draft dropped", seq=0, fatal=False))
    await publish(Verdict("s", 0, 2, 9, 6, drafted=draft_digest(len(PROMPT), u32([7, 3]))))
    with pytest.raises(SessionFailed) as info:
        await session._await_verdict(0)
    assert info.value.code is ErrorCode.INTEGRITY and session.result.forged_drafts == 1
    assert session.context == PROMPT  # nothing applied

    honest = Verdict("s", 0, 2, 9, 6, drafted=session.bound, context_digest=b"\0" * 16)  # a wrong context
    with pytest.raises(SessionFailed, match="committed context differs") as info:
        session._accept([7, 8], honest, 0.0, 1.0)
    assert info.value.code is ErrorCode.INTEGRITY and session.result.token_ids == []
    await broker.close()
