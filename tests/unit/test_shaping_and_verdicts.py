"""Network shaping delays both directions in order; the multiplexed reader loses no verdict; the
edge waits through rate-limit notices."""

from __future__ import annotations

import asyncio
import random
import time

import fakeredis
import pytest

from broker.multiplex import MultiplexedBroker, id_after
from broker.streams import FIELD, Broker, RoundResult, mac
from common.integrity import ContextDigest, u32
from common.wire import ErrorCode, ErrorMessage, SamplingSpec, Verdict, encode
from edge_worker.client import EdgeClient, EdgeConfig, SessionFailed, _EdgeSession
from edge_worker.shaping import ShapedBroker


@pytest.fixture
async def broker():
    b = Broker(fakeredis.FakeAsyncRedis(), prefix="t")
    yield b
    await b.close()


def test_one_way_delay_is_half_the_round_trip_within_the_jitter() -> None:
    shaped = ShapedBroker(Broker(fakeredis.FakeAsyncRedis()), 20.0, 10.0, random.Random(1))
    samples = [shaped.one_way_s() * 1000 for _ in range(500)]
    assert min(samples) >= 5.0 - 1e-9 and max(samples) <= 15.0 + 1e-9
    assert ShapedBroker(Broker(fakeredis.FakeAsyncRedis()), 0.0, 50.0).one_way_s() >= 0.0
    with pytest.raises(ValueError):
        ShapedBroker(Broker(fakeredis.FakeAsyncRedis()), -1.0)


async def test_shaped_sends_arrive_in_order_and_late(broker) -> None:
    shaped = ShapedBroker(broker, 40.0, 39.0, random.Random(2))
    started = time.monotonic()
    await asyncio.gather(*(shaped.send_draft("s", str(i).encode()) for i in range(10)))
    assert time.monotonic() - started >= 0.0005  # it did sleep (never assert real timings)
    entries = await broker.redis.xrange(broker.keys.drafts("s"))
    assert [fields[FIELD] for _, fields in entries] == [str(i).encode() for i in range(10)]


async def test_shaped_reads_pass_verdicts_through(broker) -> None:
    shaped = ShapedBroker(broker, 2.0)
    await broker.redis.xadd(broker.keys.verdicts("s"), {FIELD: b"v"})
    entries = await shaped.read_verdicts("s", "0-0", 10)
    assert [e.payload for e in entries] == [b"v"]


def test_stream_ids_compare_numerically() -> None:
    assert id_after("10-0", "9-5") and id_after("5-10", "5-9") and not id_after("5-1", "5-1")


async def test_multiplexed_reader_delivers_every_sessions_verdicts(broker) -> None:
    mux = MultiplexedBroker(broker, block_ms=50)
    sids = [f"s{i}" for i in range(20)]

    async def session(sid: str) -> list[bytes]:
        got, last = [], "0-0"
        while len(got) < 3:
            for entry in await mux.read_verdicts(sid, last, 200):
                last = entry.entry_id
                got.append(entry.payload)
        return got

    async def publisher() -> None:
        for round_ in range(3):
            for sid in sids:
                await broker.redis.xadd(broker.keys.verdicts(sid), {FIELD: f"{sid}-{round_}".encode()})
            await asyncio.sleep(0.01)

    results = await asyncio.wait_for(asyncio.gather(publisher(), *(session(s) for s in sids)), 20)
    for sid, got in zip(sids, results[1:], strict=True):
        assert got == [f"{sid}-{r}".encode() for r in range(3)]


async def test_multiplexed_read_times_out_empty_and_buffers_late_entries(broker) -> None:
    mux = MultiplexedBroker(broker, block_ms=20)
    assert await mux.read_verdicts("x", "0-0", 30) == []
    await broker.redis.xadd(broker.keys.verdicts("x"), {FIELD: b"late"})
    entries = await asyncio.wait_for(mux.read_verdicts("x", "0-0", 2000), 10)
    assert [e.payload for e in entries] == [b"late"]


class _NoDraft:
    model_name = "none"  # named in the edge's per-drafter round metrics

    def new_state(self) -> None:
        return None


async def test_edge_waits_through_rate_limit_notices_and_drafts_shorter(broker) -> None:
    client = EdgeClient(_NoDraft(), broker, EdgeConfig(verdict_timeout_s=0.3))  # type: ignore[arg-type]
    session = _EdgeSession(client, [1, 2, 3], SamplingSpec(), None, "s")
    notice = ErrorMessage(
        "s", ErrorCode.TENANT_LIMIT, "over its rate", seq=0, fatal=False, retry_after_s=0.25
    )

    def signed(message) -> RoundResult:
        payload = encode(message)
        return RoundResult("s", payload, [], mac=mac(session.key, payload))

    async def verifier() -> None:  # holds the draft longer than the verdict timeout, telling the edge
        await asyncio.sleep(0.2)
        await broker.publish_round([signed(notice)])
        await asyncio.sleep(0.2)
        await broker.publish_round([RoundResult("s", encode(Verdict("s", 0, 3, 9, 7)), [])])  # forged
        await broker.publish_round([signed(ErrorMessage("s", ErrorCode.MALFORMED, "x", fatal=False))])
        await broker.publish_round([signed(Verdict("s", 0, 0, 7, 4))])

    task = asyncio.create_task(verifier())
    verdict = await session._await_verdict(0)
    await task
    assert verdict.seq == 0 and verdict.token == 7 and session.result.throttled == 1
    assert session.result.forged == 1  # the unsigned verdict was dropped; the non-fatal notice too
    assert session.pressure.retry_after_s == 0.25 and session.pressure.gamma(4) == 2
    fatal = ErrorMessage("s", ErrorCode.TENANT_LIMIT, "over its session limit")
    await broker.publish_round([signed(fatal)])
    with pytest.raises(SessionFailed) as info:
        await session._await_verdict(1)
    assert info.value.code is ErrorCode.TENANT_LIMIT


def _verdict(seq: int, accepted: int, token: int, context: list[int]) -> Verdict:
    """A verdict as a verifier writes it: with the digest of the context it commits."""
    digest = ContextDigest(u32(context)).digest()
    return Verdict("s", seq, accepted, token, len(context), context_digest=digest)


async def test_edge_rewinds_to_the_committed_state_and_never_repeats_emitted_tokens(broker) -> None:
    """An out_of_order notice with a shorter committed context (Redis lost rounds) rewinds the edge."""
    emitted: list[int] = []
    client = EdgeClient(_NoDraft(), broker, EdgeConfig(verdict_timeout_s=2.0))  # type: ignore[arg-type]
    session = _EdgeSession(
        client, [1, 2, 3], SamplingSpec(max_new_tokens=10), lambda _s, t: emitted.extend(t), "s"
    )
    session._accept([7, 8], _verdict(0, 2, 9, [1, 2, 3, 7, 8, 9]), 0.0, 1.0)
    session.seq = 1
    session._accept([4], _verdict(1, 1, 5, [1, 2, 3, 7, 8, 9, 4, 5]), 0.0, 1.0)
    session.seq = 2
    assert session.context == [1, 2, 3, 7, 8, 9, 4, 5] and emitted == [7, 8, 9, 4, 5]
    payload = encode(ErrorMessage("s", ErrorCode.OUT_OF_ORDER, "behind", seq=1, fatal=False, committed=6))
    await broker.publish_round([RoundResult("s", payload, [], mac=mac(session.key, payload))])
    assert await session._await_verdict(2) is None
    assert session.context == [1, 2, 3, 7, 8, 9] and session.seq == 1 and session.result.rewinds == 1
    session._accept([4], _verdict(1, 1, 5, [1, 2, 3, 7, 8, 9, 4, 5]), 0.0, 1.0)  # the same tokens ...
    assert emitted == [7, 8, 9, 4, 5]  # ... which are not handed out twice
    session.seq = 2
    session._accept([6], _verdict(2, 0, 2, [1, 2, 3, 7, 8, 9, 4, 5, 2]), 0.0, 1.0)
    assert emitted == [7, 8, 9, 4, 5, 2]
