"""specd serve's pure parts (text deltas, request validation, responses, keys) and its app with a
stand-in runner (admission, auth, errors), plus the pool check against an unreachable Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2 as httpx
import pytest

from specd.serve import errors
from specd.serve.app import create_app
from specd.serve.auth import KeyRing
from specd.serve.context import ServeContext
from specd.serve.responses import ChunkWriter
from specd.serve.runner import Finished, Round, SessionRunner
from specd.serve.schemas import Defaults, build_generation
from specd.serve.text import Delta, TextStream


class CharTokenizer:
    """Token i is the i-th character of ``alphabet``."""

    alphabet = "abcdefghijklmnopqrstuvwxyz .\n"
    chat_template = None

    def __len__(self) -> int:
        return len(self.alphabet)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.alphabet[i] for i in ids)

    def encode(self, text: str) -> list[int]:
        return [self.alphabet.index(c) for c in text]

    def apply_chat_template(self, messages: list[dict[str, str]], **_: Any) -> str:
        return "".join(m["content"] + "\n" for m in messages)


def ids(text: str) -> list[int]:
    return CharTokenizer().encode(text)


DEFAULTS = Defaults(model="m", temperature=0.0, top_p=1.0, top_k=0, max_tokens=16, max_tokens_limit=64,
                    context_tokens=40, prompt_tokens_limit=30)


# --------------------------------------------------------------------------- text


def test_spans_split_accepted_draft_from_the_verifier_token() -> None:
    stream = TextStream(CharTokenizer())
    delta = stream.push(ids("abc"), accepted=2)
    assert delta == Delta("abc", [("ab", "draft"), ("c", "target")])
    assert stream.push(ids("d"), accepted=0) == Delta("d", [("d", "target")])
    assert stream.text == "abcd"


def test_stop_string_across_rounds_is_held_back_then_cut() -> None:
    stream = TextStream(CharTokenizer(), stops=("end",))
    assert stream.push(ids("the e"), accepted=4).text == "the "  # "e" may start "end"
    assert stream.push(ids("nd more"), accepted=6).text == ""
    assert stream.stopped and stream.text == "the "
    assert stream.finish().text == ""


def test_held_back_prefix_is_released_when_it_is_not_a_stop() -> None:
    stream = TextStream(CharTokenizer(), stops=("end",))
    assert stream.push(ids("xe"), accepted=1).text == "x"
    assert stream.push(ids("x"), accepted=0).text == "ex"
    assert stream.push(ids("en"), accepted=1).text == ""
    assert stream.finish() == Delta("en", [("e", "draft"), ("n", "target")])  # the session ended


class ByteTokenizer:
    """Token i is the byte i: a character may take several tokens, as with byte-level BPE."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_incomplete_characters_wait_for_their_last_byte() -> None:
    stream, text = TextStream(ByteTokenizer()), "héllo 😀"
    pieces = [stream.push([token], accepted=0).text for token in text.encode()]
    assert "".join(pieces) == text and all("\ufffd" not in piece for piece in pieces)


# --------------------------------------------------------------------------- requests


def bad(kind: str, body: dict[str, Any]) -> errors.APIError:
    with pytest.raises(errors.APIError) as caught:
        build_generation(kind, body, DEFAULTS, CharTokenizer())  # type: ignore[arg-type]
    return caught.value


def test_valid_requests_take_server_defaults() -> None:
    generation = build_generation("completion", {"model": "m", "prompt": "ab", "stop": "x"}, DEFAULTS,
                                  CharTokenizer())
    assert generation.prompt_ids == [0, 1] and generation.max_tokens == 16
    assert generation.temperature == 0.0 and generation.stop == ("x",)
    chat = build_generation("chat", {"model": "m", "messages": [{"role": "user", "content": "ab"}],
                                     "max_completion_tokens": 3, "stream": True,
                                     "stream_options": {"include_usage": True}}, DEFAULTS, CharTokenizer())
    assert chat.prompt_ids == ids("ab\n") and chat.max_tokens == 3 and chat.include_usage
    assert build_generation("completion", {"model": "m", "prompt": [[3, 4]]}, DEFAULTS,
                            CharTokenizer()).prompt_ids == [3, 4]


@pytest.mark.parametrize(("kind", "body", "status", "param", "code"), [
    ("completion", {"model": "x", "prompt": "a"}, 404, "model", "model_not_found"),
    ("completion", {"prompt": "a"}, 400, "model", "missing_required_parameter"),
    ("completion", {"model": "m", "prompt": "a", "temperature": -1}, 400, "temperature", None),
    ("completion", {"model": "m", "prompt": "a", "seed": -3}, 400, "seed", None),
    ("completion", {"model": "m", "prompt": "a", "presence_penalty": 0.5}, 400, "presence_penalty", None),
    ("completion", {"model": "m", "prompt": "a", "logprobs": 21}, 400, "logprobs", None),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, 400,
     "top_logprobs", None),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "a"}], "logprobs": True,
              "top_logprobs": 21}, 400, "top_logprobs", None),
    ("completion", {"model": "m", "prompt": "a", "stop": [""]}, 400, "stop", None),
    ("completion", {"model": "m", "prompt": ""}, 400, "prompt", None),
    ("completion", {"model": "m", "prompt": [1, -2]}, 400, "prompt", None),
    ("completion", {"model": "m", "prompt": "a", "stop_token_ids": [99]}, 400, "stop_token_ids", None),
    ("completion", {"model": "m", "prompt": "a" * 31}, 400, "prompt", "context_length_exceeded"),
    ("completion", {"model": "m", "prompt": "a" * 20, "max_tokens": 30}, 400, "prompt",
     "context_length_exceeded"),
    ("chat", {"model": "m", "messages": []}, 400, "messages", None),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages", None),
])
def test_bad_requests_name_the_parameter(kind: str, body: dict[str, Any], status: int, param: str,
                                         code: str | None) -> None:
    error = bad(kind, body)
    assert (error.status, error.param, error.code) == (status, param, code)
    assert error.body()["error"]["message"] == error.message


def test_keys_map_to_tenants() -> None:
    assert KeyRing({}, "default").tenant(None) == "default"
    ring = KeyRing({"sk-a": "team-a"}, "default")
    assert ring.tenant("Bearer sk-a") == "team-a"
    for header in (None, "Bearer sk-b", "sk-a", "Basic sk-a"):
        with pytest.raises(errors.APIError) as caught:
            ring.tenant(header)
        assert caught.value.status == 401 and caught.value.code == "invalid_api_key"


def test_chat_chunks_follow_openai_and_end_with_done() -> None:
    generation = build_generation("chat", {"model": "m", "messages": [{"role": "user", "content": "a"}],
                                           "stream": True, "stream_options": {"include_usage": True}},
                                  DEFAULTS, CharTokenizer())
    writer = ChunkWriter(generation, "chatcmpl-1")
    first = json.loads(writer.start()[6:])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"
    middle = json.loads(writer.delta(Delta("ab", [("ab", "draft")]), {"round": 1})[6:])
    assert middle["choices"][0]["delta"] == {"content": "ab"}
    assert middle["specd"]["spans"] == [["ab", "draft"]]
    tail = writer.finish("length", {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}, {})
    events = [e for e in tail.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["usage"]["total_tokens"] == 3


# --------------------------------------------------------------------------- app (stand-in runner)


class StubRunner(SessionRunner):
    """The real admission, a pool check and session that never touch Redis or a model."""

    def __init__(self, max_concurrent: int, queue_size: int = 0) -> None:
        from specd.serve.admission import Admission
        from specd.serve.metrics import ServeMetrics

        self.tokenizer = CharTokenizer()
        self.max_concurrent = max_concurrent
        self.metrics = ServeMetrics()
        self.admission = Admission(max_concurrent, queue_size, 60.0, self.metrics)
        self.pool_error: errors.APIError | None = None

    async def check_pool(self) -> None:
        if self.pool_error is not None:
            raise self.pool_error

    async def rounds(self, generation: Any, tenant: str, sid: str) -> AsyncIterator[Round | Finished]:  # type: ignore[override]
        yield Round(Delta("ab", [("a", "draft"), ("b", "target")]), {"round": 1, "accepted": 1, "target": 1})
        yield Finished("ab", "length", 2, {"tenant": tenant, "ttft_ms": 1.0})


def client_for(runner: StubRunner, keys: dict[str, str] | None = None) -> Any:
    context = ServeContext(runner, DEFAULTS, KeyRing(keys or {}, "default"), [])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(context)), base_url="http://t")


BODY = {"model": "m", "prompt": "ab"}


async def test_over_max_concurrent_gets_429_and_a_free_slot_serves_again() -> None:
    runner = StubRunner(max_concurrent=1)
    async with client_for(runner) as client:
        release = await runner.acquire()  # one request in flight
        busy = await client.post("/v1/completions", json=BODY)
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "rate_limit_exceeded"
        assert busy.headers["retry-after"] == "1"
        release()
        served = await client.post("/v1/completions", json=BODY)
        assert served.status_code == 200 and served.json()["choices"][0]["text"] == "ab"
        assert runner.active == 0


async def test_api_keys_pick_the_tenant_and_guard_the_api() -> None:
    runner = StubRunner(max_concurrent=2)
    async with client_for(runner, {"sk-a": "team-a"}) as client:
        denied = await client.post("/v1/completions", json=BODY)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        assert (await client.get("/v1/models")).status_code == 401
        ok = await client.post("/v1/completions", json=BODY, headers={"Authorization": "Bearer sk-a"})
        assert ok.json()["specd"]["tenant"] == "team-a"
        assert (await client.get("/health")).status_code == 200  # health and the page need no key


async def test_pool_unavailable_is_503_for_requests_and_health() -> None:
    runner = StubRunner(max_concurrent=2)
    runner.pool_error = errors.pool_unavailable("Redis is unreachable (refused)")
    async with client_for(runner) as client:
        reply = await client.post("/v1/chat/completions",
                                  json={"model": "m", "messages": [{"role": "user", "content": "a"}]})
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "pool_unavailable"
        assert (await client.get("/health")).status_code == 503
        assert runner.active == 0


async def test_streamed_completion_is_server_sent_events() -> None:
    async with client_for(StubRunner(max_concurrent=2)) as client:
        reply = await client.post("/v1/completions", json={**BODY, "stream": True})
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [e[6:] for e in reply.text.split("\n\n") if e]
        assert events[-1] == "[DONE]"
        assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == ["ab", ""]
        assert (await client.get("/")).text.startswith("<!doctype html>")


async def test_pool_check_against_an_unreachable_redis_is_a_prompt_503() -> None:
    from broker.streams import Broker, connect

    broker = Broker(connect("redis://127.0.0.1:1/0", socket_timeout_s=1.0))
    runner = SessionRunner.__new__(SessionRunner)
    runner.broker, runner.pool_check_timeout_s, runner._pool_ok_until = broker, 2.0, 0.0
    with pytest.raises(errors.APIError) as caught:
        await runner.check_pool()
    await broker.close()
    assert caught.value.status == 503 and "unreachable" in caught.value.message


# --------------------------------------------------------------------------- the request queue


def _admission(limit: int, queue_size: int, timeout_s: float = 60.0) -> Any:
    from specd.serve.admission import Admission
    from specd.serve.metrics import ServeMetrics

    return Admission(limit, queue_size, timeout_s, ServeMetrics())


async def _queued(admission: Any, count: int) -> None:
    """Until ``count`` requests wait (each waiter enqueues itself on its first step)."""
    while admission.waiting < count:
        await asyncio.sleep(0)


async def test_queue_admits_in_arrival_order_and_refuses_past_its_size() -> None:
    admission = _admission(limit=1, queue_size=2)
    first = await admission.acquire()
    order: list[str] = []

    async def request(name: str) -> None:
        release = await admission.acquire()
        order.append(name)
        release()

    waiters = [asyncio.create_task(request("b"))]
    await _queued(admission, 1)
    waiters.append(asyncio.create_task(request("c")))
    await _queued(admission, 2)
    with pytest.raises(errors.APIError) as full:
        await admission.acquire()
    assert full.value.status == 429 and full.value.code == "rate_limit_exceeded"
    assert "serve.queue_size" in full.value.message
    assert admission.metrics.queue_length._value.get() == 2
    first()
    first()  # idempotent: a second release frees nothing more
    await asyncio.gather(*waiters)
    assert order == ["b", "c"] and admission.running == 0 and admission.waiting == 0
    assert admission.metrics.queue_rejected.labels("full")._value.get() == 1


async def test_a_wait_past_the_queue_timeout_is_429_and_leaves_the_queue() -> None:
    admission = _admission(limit=1, queue_size=4, timeout_s=0.01)
    hold = await admission.acquire()  # never released while the other waits
    with pytest.raises(errors.APIError) as late:
        await admission.acquire()
    assert late.value.status == 429 and "serve.queue_timeout_s" in late.value.message
    assert admission.waiting == 0 and admission.metrics.queue_rejected.labels("timeout")._value.get() == 1
    hold()
    assert admission.running == 0


async def test_a_cancelled_waiter_passes_its_slot_on() -> None:
    admission = _admission(limit=1, queue_size=4)
    hold = await admission.acquire()
    gone = asyncio.create_task(admission.acquire())
    await _queued(admission, 1)
    after = asyncio.create_task(admission.acquire())
    await _queued(admission, 2)
    hold()  # the slot goes to ``gone``, which is cancelled before it runs: it must reach ``after``
    gone.cancel()
    release = await after
    assert gone.cancelled() and admission.running == 1 and admission.waiting == 0
    release()
    assert admission.running == 0


async def test_app_queues_past_max_concurrent_instead_of_refusing() -> None:
    runner = StubRunner(max_concurrent=1, queue_size=1)
    async with client_for(runner) as client:
        release = await runner.acquire()
        queued = asyncio.create_task(client.post("/v1/completions", json=BODY))
        await _queued(runner.admission, 1)
        assert (await client.get("/health")).json()["queued"] == 1
        refused = await client.post("/v1/completions", json=BODY)
        assert refused.status_code == 429
        release()
        served = await queued
        assert served.status_code == 200 and served.json()["choices"][0]["text"] == "ab"
        metrics = (await client.get("/metrics")).text
        assert "specd_serve_queue_length 0.0" in metrics
        assert "specd_serve_queue_wait_seconds_count 2.0" in metrics


def test_tokens_are_released_with_their_text() -> None:
    stream = TextStream(CharTokenizer(), stops=("end",))
    first = stream.push(ids("ab e"), accepted=3)  # "e" held back: its round's tokens wait too
    assert (first.text, first.tokens) == ("ab ", 0)
    second = stream.push(ids("x"), accepted=0)
    assert (second.text, second.tokens) == ("ex", 5)
    third = stream.push(ids("yzen"), accepted=3)  # "en" may become "end"
    assert (third.text, third.tokens) == ("yz", 0)
    cut = stream.push(ids("dq"), accepted=1)  # the stop: tokens that start before it are released
    assert (cut.text, cut.tokens, stream.released) == ("", 2, 7)
    tail = TextStream(CharTokenizer())
    tail.push(ids("ab"), accepted=1)
    assert tail.finish().tokens == 0 and tail.released == 2


def test_logprobs_take_openai_shapes() -> None:
    from edge_worker.client import TokenLogprob
    from specd.serve.logprobs import LogprobFormat

    entries = [TokenLogprob(0, -0.5, ((0, -0.5), (1, -1.5))), TokenLogprob(2, -2.0, ((1, -0.25), (0, -1.0)))]
    completion = LogprobFormat(CharTokenizer()).completion(entries)
    assert completion == {"tokens": ["a", "c"], "token_logprobs": [-0.5, -2.0], "text_offset": [0, 1],
                          "top_logprobs": [{"a": -0.5, "b": -1.5}, {"b": -0.25, "a": -1.0, "c": -2.0}]}
    chat = LogprobFormat(CharTokenizer(), as_ids=True).chat(entries[:1])
    assert chat == {"refusal": None, "content": [{
        "token": "token_id:0", "logprob": -0.5, "bytes": list(b"token_id:0"),
        "top_logprobs": [{"token": "token_id:0", "logprob": -0.5, "bytes": list(b"token_id:0")},
                         {"token": "token_id:1", "logprob": -1.5, "bytes": list(b"token_id:1")}]}]}
    generation = build_generation("chat", {"model": "m", "messages": [{"role": "user", "content": "a"}],
                                           "logprobs": True}, DEFAULTS, CharTokenizer())
    assert generation.logprobs == 0
    plain = build_generation("completion", {"model": "m", "prompt": "a"}, DEFAULTS, CharTokenizer())
    assert plain.logprobs is None
