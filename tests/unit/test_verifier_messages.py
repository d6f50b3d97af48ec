"""The verifier answers bad input with typed errors and keeps serving other sessions (fakeredis)."""

from __future__ import annotations

import fakeredis
import msgpack
import numpy as np
import pytest
from honest import HonestBroker

from common.models import load_causal_lm
from common.settings import Settings
from common.wire import (
    DraftBatch,
    ErrorCode,
    ErrorMessage,
    SamplingSpec,
    SessionOpen,
    Verdict,
    decode,
    encode,
)
from verifier_worker.engine import TargetEngine
from verifier_worker.worker import VerifierWorker


@pytest.fixture(scope="module")
def target(tiny_pair):
    return load_causal_lm(tiny_pair["target"])


@pytest.fixture
async def worker(target):
    broker = HonestBroker(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()), prefix="t")
    w = VerifierWorker(Settings(verifier={"idle_block_ms": 1}),
                       TargetEngine(target.model, target.vocab_size), broker, "tiny", target.fingerprint,
                       worker_id="w1")
    await w.startup()
    yield w
    await broker.close()


def opened(sid: str, target, prompt: str = "import os", temperature: float = 0.0) -> bytes:
    ids = np.asarray(target.tokenizer.encode(prompt), np.uint32)
    return encode(SessionOpen(sid, ids, SamplingSpec(temperature=temperature, max_new_tokens=8),
                              "draft", target.fingerprint))


def greedy_draft(sid: str, seq: int, start: int, tokens: list[int]) -> bytes:
    empty = np.zeros(0, np.uint32)
    return encode(DraftBatch(sid, seq, start, np.asarray(tokens, np.uint32), np.zeros(0, np.uint16),
                             empty, np.zeros(0, np.float32)))


async def messages(worker: VerifierWorker, sid: str) -> list:
    entries = await worker.broker.read_verdicts(sid, "0-0", block_ms=1)
    return [decode(e.payload) for e in entries]


async def settle(worker: VerifierWorker, iterations: int = 4) -> None:
    for _ in range(iterations):
        await worker.iterate()


def _draft_with(field: str, value, sid: str = "bad", start: int = 2) -> bytes:
    body = msgpack.unpackb(greedy_draft(sid, 0, start, [5]), raw=False)
    body[field] = value
    return msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize("payload, code", [
    (b"\xc1\xc1 not msgpack", ErrorCode.MALFORMED),
    (_draft_with("v", 1), ErrorCode.UNSUPPORTED_VERSION),  # the schema before integrity
    (_draft_with("tokens", np.array([10**6], "<u4").tobytes()), ErrorCode.INVALID_TOKEN),
    (None, ErrorCode.INVALID_DISTRIBUTION),  # NaN probabilities, built below
])
async def test_bad_draft_gets_typed_error_and_others_keep_going(worker, target, payload, code) -> None:
    for sid in ("bad", "good"):
        await worker.broker.open_session(sid, opened(sid, target, temperature=0.8 if sid == "bad" else 0))
    await settle(worker, 2)
    start = len(target.tokenizer.encode("import os"))
    if payload is None:
        payload = encode(DraftBatch("bad", 0, start, np.array([5], np.uint32), np.array([2], np.uint16),
                                    np.array([5, 6], np.uint32), np.array([np.nan, 0.5], np.float32)))
    await worker.broker.send_draft("bad", payload)
    await worker.broker.send_draft("good", greedy_draft("good", 0, start, [5, 6]))
    await settle(worker)
    [error] = await messages(worker, "bad")
    assert isinstance(error, ErrorMessage) and error.code is code
    [verdict] = await messages(worker, "good")
    assert isinstance(verdict, Verdict) and verdict.seq == 0
    assert (await worker.broker.redis.xpending(worker.broker.keys.drafts("bad"), "verifiers"))["pending"] == 0


async def test_out_of_order_and_duplicate_drafts(worker, target) -> None:
    await worker.broker.open_session("s", opened("s", target))
    await settle(worker, 2)
    start = len(target.tokenizer.encode("import os"))
    await worker.broker.send_draft("s", greedy_draft("s", 0, start, [5]))
    await settle(worker)
    await worker.broker.send_draft("s", greedy_draft("s", 0, start, [5]))  # duplicate delivery
    await worker.broker.send_draft("s", greedy_draft("s", 5, start, [5]))  # a gap
    await settle(worker)
    first, replay, gap = await messages(worker, "s")
    assert isinstance(first, Verdict) and first == replay  # same verdict again, no new tokens
    assert isinstance(gap, ErrorMessage) and gap.code is ErrorCode.OUT_OF_ORDER
    assert worker.sessions["s"].next_seq == 1 and len(worker.sessions["s"].context) == first.committed


async def test_tokenizer_mismatch_is_refused_at_open(worker, target) -> None:
    ids = np.asarray([1, 2, 3], np.uint32)
    await worker.broker.open_session("m", encode(SessionOpen("m", ids, SamplingSpec(), "other-draft",
                                                             "f" * 32)))
    await settle(worker, 2)
    [error] = await messages(worker, "m")
    assert error.code is ErrorCode.TOKENIZER_MISMATCH and "other-draft" in error.message
    assert "tiny" in error.message and "m" not in worker.sessions


async def test_garbage_on_the_sessions_stream_is_dropped(worker, target) -> None:
    await worker.broker.open_session("x", b"\x00garbage")
    await worker.broker.open_session("ok", opened("ok", target))
    await settle(worker, 2)
    assert "ok" in worker.sessions and worker.stats.errors == {"malformed": 1}
