"""End to end through a real redis-server: verifier and edge clients in this process."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
from local_pool import local_pool

from common.sampling import SamplingParams
from common.settings import Settings
from common.wire import SCHEMA_VERSION, ErrorCode, SamplingSpec
from edge_worker.client import EdgeConfig, SessionFailed
from verifier_worker.engine import generate_target_only

pytestmark = pytest.mark.integration

PROMPTS = ["def add(a, b):", "import os", "class Stack:", "for i in range(10):", "print(x)"]


def settings_for(redis_url: str, tiny_pair: dict, draft: str = "draft", **edge) -> Settings:
    return Settings(redis={"url": redis_url, "key_prefix": "it"},
                    models={"target": tiny_pair["target"], "draft": tiny_pair[draft]},
                    verifier={"idle_block_ms": 20}, edge={"verdict_timeout_s": 30, **edge})


def pool(settings: Settings):
    return local_pool(settings, worker_id="v-test")


def greedy_reference(verifier, tokenizer, prompt: str, n: int, stops=frozenset()) -> list[int]:
    return generate_target_only(verifier.engine, tokenizer.encode(prompt), SamplingParams(), stops, n)


async def test_greedy_speculative_equals_target_greedy_in_shared_batches(redis_url, tiny_pair) -> None:
    async with pool(settings_for(redis_url, tiny_pair)) as (verifier, edge):
        tokenizer = edge.backend.tokenizer
        for gamma in (1, 3, 5):
            edge.config = EdgeConfig(gamma=gamma, verdict_timeout_s=30)
            results = await asyncio.gather(*(
                edge.generate(tokenizer.encode(p), SamplingSpec(max_new_tokens=24)) for p in PROMPTS))
            for prompt, result in zip(PROMPTS, results, strict=True):
                assert result.token_ids == greedy_reference(verifier, tokenizer, prompt, 24), (gamma, prompt)
        assert max(verifier.stats.batch_sizes) > 1  # several sessions verified in one pass
        assert sum(r.accepted for r in results) < sum(r.drafted for r in results)


async def test_identical_draft_accepts_all_with_ceil_passes(redis_url, tiny_pair) -> None:
    async with pool(settings_for(redis_url, tiny_pair, draft="target")) as (verifier, edge):
        tokenizer = edge.backend.tokenizer
        for gamma, total in ((3, 17), (5, 12), (1, 1)):
            edge.config = EdgeConfig(gamma=gamma)
            before = verifier.engine.forward_passes
            result = await edge.generate(tokenizer.encode("import os"), SamplingSpec(max_new_tokens=total))
            assert len(result.token_ids) == total and result.accepted == result.drafted
            expected_passes = -(-total // (gamma + 1))
            assert result.target_forward_passes == expected_passes
            assert verifier.engine.forward_passes - before == expected_passes


async def test_stop_token_inside_accepted_draft_ends_output(redis_url, tiny_pair) -> None:
    async with pool(settings_for(redis_url, tiny_pair, draft="target", gamma=6)) as (verifier, edge):
        tokenizer = edge.backend.tokenizer
        free = greedy_reference(verifier, tokenizer, "class Stack:", 16)
        stop = free[4]
        cut = free.index(stop) + 1
        result = await edge.generate(tokenizer.encode("class Stack:"),
                                     SamplingSpec(max_new_tokens=16, stop_token_ids=(stop,)))
        assert result.token_ids == free[:cut] and result.finish_reason == "stop"
        assert result.rounds == 1  # the stop token was inside the first, fully accepted draft


async def test_seeded_sampling_is_reproducible(redis_url, tiny_pair) -> None:
    async with pool(settings_for(redis_url, tiny_pair)) as (_, edge):
        ids = edge.backend.tokenizer.encode("def add(a, b):")
        spec = SamplingSpec(temperature=0.9, top_p=0.95, seed=77, max_new_tokens=20)
        first, again = await asyncio.gather(edge.generate(ids, spec), edge.generate(ids, spec))
        other = await edge.generate(ids, SamplingSpec(0.9, 0.95, 0, 78, 20))
        assert first.token_ids == again.token_ids != other.token_ids


async def test_hostile_messages_do_not_disturb_other_sessions(redis_url, tiny_pair) -> None:
    async with pool(settings_for(redis_url, tiny_pair)) as (verifier, edge):
        tokenizer = edge.backend.tokenizer
        broker = edge.broker
        # A session opened by a well-behaved edge, then garbage on its stream and on the open stream.
        await broker.open_session("junk", b"\xc1\xc1")
        bad_open = msgpack.packb({"v": SCHEMA_VERSION, "t": "open", "sid": "evil",
                                  "prompt": b"\xff\xff\xff\xff", "sampling": {}}, use_bin_type=True)
        await broker.open_session("evil", bad_open)
        runs = [edge.generate(tokenizer.encode(p), SamplingSpec(max_new_tokens=20)) for p in PROMPTS[:3]]
        results = await asyncio.gather(*runs)
        for prompt, result in zip(PROMPTS, results, strict=False):
            assert result.token_ids == greedy_reference(verifier, tokenizer, prompt, 20)
        [error] = await broker.read_verdicts("evil", "0-0", block_ms=100)
        from common.wire import decode

        assert decode(error.payload).code in (ErrorCode.MALFORMED, ErrorCode.INVALID_TOKEN)
        assert verifier.stats.errors


async def test_edge_fails_clearly_on_tokenizer_mismatch(redis_url, tiny_pair, tmp_path) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tiny_models

    other_tok = tiny_models.build_tokenizer(corpus=tiny_models.OTHER_CORPUS)
    other = tiny_models.save(tiny_models.random_model(other_tok, 5, 32, 1), other_tok, tmp_path / "other")
    settings = Settings(redis={"url": redis_url, "key_prefix": "it-mm"},
                        models={"target": tiny_pair["target"], "draft": str(other)})
    async with pool(settings) as (_, edge):
        with pytest.raises(SessionFailed) as info:
            await edge.generate([1, 2, 3], SamplingSpec(max_new_tokens=4))
        assert info.value.code is ErrorCode.TOKENIZER_MISMATCH
        assert str(other) in str(info.value) and tiny_pair["target"] in str(info.value)


async def test_blocked_read_survives_its_stream_being_deleted(redis_url) -> None:
    """Redis answers UNBLOCKED when a stream a read blocks on is deleted: no verifier crash."""
    import redis.asyncio as aioredis

    from broker.streams import Broker

    client = aioredis.Redis.from_url(redis_url)
    broker = Broker(client, "unblock")
    stream = broker.keys.drafts("gone")
    await broker.ensure_group(stream)
    read = asyncio.create_task(broker.read_work("v", [stream], block_ms=5000))
    await asyncio.sleep(0.2)  # the read is blocked on the stream now
    await client.delete(stream)
    assert await asyncio.wait_for(read, timeout=5) == []
    await client.aclose()
