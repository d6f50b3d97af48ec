"""`specd serve` as a real process against a real redis-server and a `specd verifier` process,
driven by the official openai client, raw HTTP, curl (killed mid-stream) and headless Chromium;
`specd chat` on the embedded default through its stdin."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from conftest import _free_port  # noqa: E402

pytestmark = pytest.mark.integration

MODEL = "bundled:target"
ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [
    "def fibonacci(n):\n", "import os\nimport sys\n", "class Stack:\n    def __init__(self):\n",
    "def read_config(path):\n", "    for i in range(len(items)):\n", "def is_prime(n):\n",
    "class Node:\n", "def main():\n", "    return self.", "def parse(text):\n", "import json\n",
    "def __repr__(self):\n", "    if not path:\n", "class Error(Exception):\n", "def test_", "# utils\n",
]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", SPECD_MODELS__TORCH_THREADS="1",
               PYTHONUNBUFFERED="1")
    kept = ("SPECD_MODELS__TORCH_THREADS", "SPECD_MODELS__TARGET", "SPECD_MODELS__DRAFT")  # the tiny pair
    return {k: v for k, v in env.items() if not k.startswith("SPECD_") or k in kept}


@dataclass
class Served:
    url: str
    metrics_port: int  # the verifier's /metrics
    redis_url: str
    verifier_pid: int = 0


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_ready(url: str, processes: list[subprocess.Popen[bytes]], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for process in processes:
            assert process.poll() is None, f"{process.args} exited with {process.returncode}"
        try:
            if _get(url + "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError("specd serve did not become healthy")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def served(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    logs = tmp_path_factory.mktemp("serve-logs")
    metrics_port, port = _free_port(), _free_port()
    verifier = subprocess.Popen(
        [sys.executable, "-m", "specd", "verifier", "--redis-url", redis_url, "--metrics-port",
         str(metrics_port), "--log-format", "json"],
        env=_env(), stdout=subprocess.DEVNULL, stderr=open(logs / "verifier.log", "wb"))  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "specd", "serve", "--redis-url", redis_url, "--port", str(port),
         "--max-concurrent", "20", "--log-format", "json"],
        env=_env(), stdout=subprocess.DEVNULL, stderr=open(logs / "serve.log", "wb"))  # noqa: SIM115
    try:
        _wait_ready(f"http://127.0.0.1:{port}", [verifier, server])
        yield Served(f"http://127.0.0.1:{port}", metrics_port, redis_url, verifier.pid)
    finally:
        _stop(server)
        _stop(verifier)
    assert server.returncode == 0, (logs / "serve.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def target_model() -> object:
    from common.models import load_causal_lm

    return load_causal_lm(MODEL, "float32", "cpu")


@pytest.fixture(scope="module")
def target_greedy(target_model) -> Iterator[object]:
    """The target's own greedy continuation of some prompt ids (the model loaded once)."""
    from common.sampling import SamplingParams
    from verifier_worker.engine import TargetEngine, generate_target_only

    target = target_model
    engine = TargetEngine(target.model, target.vocab_size)

    def greedy(prompt_ids: list[int], max_tokens: int) -> str:
        tokens = generate_target_only(engine, prompt_ids, SamplingParams(0.0, 1.0, 0, 0),
                                      frozenset(target.eos_token_ids), max_tokens)
        return str(target.tokenizer.decode(tokens, skip_special_tokens=True))

    def greedy_ids(prompt_ids: list[int], max_tokens: int) -> list[int]:
        return generate_target_only(engine, prompt_ids, SamplingParams(0.0, 1.0, 0, 0),
                                    frozenset(target.eos_token_ids), max_tokens)

    greedy.tokenizer = target.tokenizer  # type: ignore[attr-defined]
    greedy.ids = greedy_ids  # type: ignore[attr-defined]
    greedy.model = target.model  # type: ignore[attr-defined]
    yield greedy


def _client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _scrape(port: int) -> dict[str, float]:
    text = _get(f"http://127.0.0.1:{port}/metrics")[1].decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def _sum(samples: dict[str, float], name: str, **labels: str) -> float:
    wanted = [f"{k}={v}" for k, v in labels.items()]
    return sum(v for k, v in samples.items()
               if k.startswith(name + "{") and all(w in k for w in wanted))


# --------------------------------------------------------------------------- done means 1


def test_openai_client_completions_equal_specd_generate_target(served: Served) -> None:
    prompt = PROMPTS[0]
    reference = subprocess.run(
        [sys.executable, "-m", "specd", "generate", "--mode", "target", "--json", "--prompt", prompt,
         "--max-new-tokens", "40"], env=_env(), capture_output=True, check=True, timeout=120)
    expected = json.loads(reference.stdout)["text"]
    client = _client(served)
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]

    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0)
    assert whole.choices[0].text == expected
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 40 and whole.usage.prompt_tokens > 0
    figures = whole.model_extra["specd"]
    assert figures["target_forward_passes"] == figures["rounds"] >= 1
    assert 0 <= figures["acceptance_rate"] <= 1 and figures["tokens_per_round"] >= 1

    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0,
                                         stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_client_chat_equals_target_greedy(served: Served, target_greedy) -> None:
    messages = [{"role": "system", "content": "Write Python."}, {"role": "user", "content": "a stack"}]
    rendered = '"""Write Python."""\n"""a stack"""\n'  # the bundled template
    expected = target_greedy(target_greedy.tokenizer.encode(rendered), 32)
    client = _client(served)
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    spans = [s for c in chunks if c.choices for s in (c.model_extra.get("specd") or {}).get("spans", [])]
    assert "".join(text for text, _ in spans) == expected  # draft and verifier spans cover the text
    assert {source for _, source in spans} <= {"draft", "target"}


def test_stop_strings_and_seeded_sampling(served: Served, target_greedy) -> None:
    client = _client(served)
    full = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=40, temperature=0)
    text = full.choices[0].text
    stop = text[10:13]
    cut = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=40, temperature=0,
                                    stop=[stop], stream=True)
    chunks = list(cut)
    assert "".join(c.choices[0].text for c in chunks) == text[: text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=24, temperature=0.8,
                                         top_p=0.95, seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


# --------------------------------------------------------------------------- done means 2


async def test_sixteen_concurrent_streams_get_their_greedy_output_batched(served: Served) -> None:
    client = _client(served)
    single = [client.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0).choices[0].text
              for p in PROMPTS]
    before = _scrape(served.metrics_port)
    aclient = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(prompt: str) -> str:
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                                  stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream])

    concurrent = await asyncio.gather(*(one(p) for p in PROMPTS))
    await aclient.close()
    assert concurrent == single
    after = _scrape(served.metrics_port)
    name = "specd_verifier_batch_sessions_count"
    passes = _sum(after, name) - _sum(before, name)
    singles = (_sum(after, "specd_verifier_batch_sessions_bucket", le="1.0")
               - _sum(before, "specd_verifier_batch_sessions_bucket", le="1.0"))
    print(f"16 concurrent streams: {passes:.0f} forward passes, {passes - singles:.0f} verified more than "
          "one session")  # shown with -s
    assert passes - singles > 0, "no forward pass verified more than one session"


# --------------------------------------------------------------------------- logprobs


def _ids_of(names: list[str]) -> list[int]:
    assert all(name.startswith("token_id:") for name in names), names[:3]
    return [int(name[len("token_id:"):]) for name in names]


def _check_logprobs(target_greedy, prompt_ids: list[int], ids: list[int], chosen: list[float],
                    top: list[list[tuple[int, float]]], n: int) -> None:
    """Token ids exactly target-only greedy decoding's; each figure the target's own log-softmax
    over the whole sequence (one plain forward here) within float32 tolerance; the top n are the n
    most likely tokens (any order among near-ties)."""
    import torch

    assert ids == target_greedy.ids(prompt_ids, len(ids))
    with torch.no_grad():
        logits = target_greedy.model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1:-1]
    reference = torch.log_softmax(logits.float(), dim=-1)
    expected = reference.gather(1, torch.tensor(ids).unsqueeze(1)).squeeze(1)
    assert chosen == pytest.approx(expected.tolist(), abs=1e-4)
    nth = reference.topk(n).values[:, -1] if n else None
    for row, alternatives in enumerate(top):
        assert len(alternatives) == n and len({t for t, _ in alternatives}) == n
        for token, value in alternatives:
            assert value == pytest.approx(float(reference[row, token]), abs=1e-4)
            assert nth is None or value >= float(nth[row]) - 1e-4


def test_completion_logprobs_equal_target_only_decoding(served: Served, target_greedy) -> None:
    client, prompt, n = _client(served), PROMPTS[6], 4
    prompt_ids = target_greedy.tokenizer.encode(prompt)
    ask = dict(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, logprobs=n,
               extra_body={"return_tokens_as_token_ids": True})
    whole = client.completions.create(**ask).choices[0].logprobs
    ids = _ids_of(whole.tokens)
    # greedy: the chosen token is the most likely, so each map is the top n (OpenAI adds the chosen
    # token when it is not among them)
    tops = [list(zip(_ids_of(list(t)), t.values(), strict=True)) for t in whole.top_logprobs]
    _check_logprobs(target_greedy, prompt_ids, ids, whole.token_logprobs, tops, n)
    assert whole.text_offset[0] == 0 and whole.text_offset == sorted(whole.text_offset)
    chunks = list(client.completions.create(**ask, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
    assert len(streamed) > 1  # per round, as the text streams
    assert [t for lp in streamed for t in lp.tokens] == whole.tokens
    assert [v for lp in streamed for v in lp.token_logprobs] == whole.token_logprobs
    assert [t for lp in streamed for t in lp.top_logprobs] == whole.top_logprobs
    assert [o for lp in streamed for o in lp.text_offset] == whole.text_offset
    named = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, logprobs=0)
    names = named.choices[0].logprobs.tokens
    assert names == [target_greedy.tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    assert [list(t) for t in named.choices[0].logprobs.top_logprobs] == [[name] for name in names]
    sampled = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0.9, seed=3,
                                        logprobs=2)
    assert len(sampled.choices[0].logprobs.tokens) == sampled.usage.completion_tokens
    assert all(value <= 0 for value in sampled.choices[0].logprobs.token_logprobs)


def test_chat_logprobs_equal_target_only_decoding_streamed_and_not(served: Served, target_greedy) -> None:
    client, n = _client(served), 3
    messages = [{"role": "user", "content": "a queue class"}]
    prompt_ids = target_greedy.tokenizer.encode('"""a queue class"""\n')  # the bundled template
    ask = dict(model=MODEL, messages=messages, max_tokens=24, temperature=0, logprobs=True, top_logprobs=n,
               extra_body={"return_tokens_as_token_ids": True})
    content = client.chat.completions.create(**ask).choices[0].logprobs.content
    ids = _ids_of([c.token for c in content])
    tops = [list(zip(_ids_of([t.token for t in c.top_logprobs]), [t.logprob for t in c.top_logprobs],
                     strict=True)) for c in content]
    _check_logprobs(target_greedy, prompt_ids, ids, [c.logprob for c in content], tops, n)
    assert content[0].bytes == list(content[0].token.encode())
    chunks = list(client.chat.completions.create(**ask, stream=True))
    streamed = [item for c in chunks if c.choices and c.choices[0].logprobs
                for item in c.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    assert [[t.token for t in c.top_logprobs] for c in streamed] == [[t.token for t in c.top_logprobs]
                                                                      for c in content]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None  # not asked: none (and nothing extra on the wire)


# --------------------------------------------------------------------------- the request queue


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _wait_for_metric(url: str, name: str, value: float) -> None:
    """Until the server's /metrics shows ``name`` at ``value`` (an event to wait on, not a time)."""
    deadline = time.monotonic() + 60
    while _sum(_scrape(_port_of(url)), name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.05)


def test_requests_past_max_concurrent_wait_in_a_fifo_queue(served: Served, tmp_path: Path) -> None:
    """max_concurrent 1, a queue of 2, on a key prefix no verifier serves yet (a stand-in heartbeat
    passes the pool check): the first request holds the slot, two more queue, a fourth is refused
    with 429; then a verifier starts on that prefix and the three all get their greedy text."""
    import redis

    env = {**_env(), "SPECD_REDIS__KEY_PREFIX": "queued", "SPECD_EDGE__VERDICT_TIMEOUT_S": "300"}
    stand_in = redis.Redis.from_url(served.redis_url)
    stand_in.set("queued:health:verifier:stand-in", b"1", ex=600)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "specd", "serve", "--redis-url", served.redis_url, "--port", str(port),
         "--max-concurrent", "1", "--queue-size", "2", "--queue-timeout", "600", "--log-format", "json"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "wb"))  # noqa: SIM115
    url, verifier = f"http://127.0.0.1:{port}", None
    ask = dict(model=MODEL, max_tokens=8, temperature=0)
    expected = [_client(served).completions.create(prompt=p, **ask).choices[0].text for p in PROMPTS[:3]]
    try:
        _wait_ready(url, [server])
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            replies = [pool.submit(client.completions.create, prompt=PROMPTS[0], **ask)]
            _wait_for_metric(url, "specd_serve_requests_in_flight", 1)
            for queued, prompt in enumerate(PROMPTS[1:3], start=1):  # one after the other: FIFO
                replies.append(pool.submit(client.completions.create, prompt=prompt, **ask))
                _wait_for_metric(url, "specd_serve_queue_length", queued)
            with pytest.raises(openai.RateLimitError) as refused:
                client.completions.create(prompt=PROMPTS[3], **ask)
            waiting = _scrape(port)
            verifier = subprocess.Popen([sys.executable, "-m", "specd", "verifier", "--redis-url",
                                         served.redis_url, "--log-format", "json"], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            texts = [reply.result().choices[0].text for reply in replies]
        assert texts == expected
        assert refused.value.status_code == 429 and "serve.queue_size" in refused.value.message
        assert _sum(waiting, "specd_serve_queue_length") == 2
        assert _sum(waiting, "specd_serve_requests_in_flight") == 1
        assert _sum(waiting, "specd_serve_queue_rejected_total", reason="full") == 1
        after = _scrape(port)
        assert _sum(after, "specd_serve_queue_length") == 0
        assert _sum(after, "specd_serve_queue_wait_seconds_count") == 3  # the refused one never waited
    finally:
        stand_in.delete("queued:health:verifier:stand-in")
        stand_in.close()
        _stop(server)
        if verifier is not None:
            _stop(verifier)
    assert server.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]


# --------------------------------------------------------------------------- done means 3


@pytest.mark.parametrize(("body", "status", "param", "code"), [
    (b"{not json", 400, None, None),
    (b'["a list"]', 400, None, None),
    (b'{"model": "gpt-4", "prompt": "hi"}', 404, "model", "model_not_found"),
    (b'{"prompt": "hi"}', 400, "model", "missing_required_parameter"),
    (b'{"model": "bundled:target", "prompt": "hi", "temperature": 3}', 400, "temperature", None),
    (b'{"model": "bundled:target", "prompt": "hi", "top_p": 0}', 400, "top_p", None),
    (b'{"model": "bundled:target", "prompt": "hi", "max_tokens": 0}', 400, "max_tokens", None),
    (b'{"model": "bundled:target", "prompt": "hi", "max_tokens": 100000}', 400, "max_tokens", None),
    (b'{"model": "bundled:target", "prompt": "hi", "n": 2}', 400, "n", None),
    (b'{"model": "bundled:target", "prompt": "hi", "stop": ["a","b","c","d","e"]}', 400, "stop", None),
    (b'{"model": "bundled:target", "prompt": ["one", "two"]}', 400, "prompt", None),
    (b'{"model": "bundled:target", "prompt": "' + b"x = 1\\n" * 2000 + b'"}', 400, "prompt",
     "context_length_exceeded"),
])
def test_bad_completion_requests_get_openai_errors(served: Served, body: bytes, status: int,
                                                   param: str | None, code: str | None) -> None:
    request = urllib.request.Request(served.url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    got_status, raw = _get_request(request)
    assert got_status == status, raw
    error = json.loads(raw)["error"]
    assert error["param"] == param and error["code"] == code
    assert error["message"] and error["type"] == "invalid_request_error"


def _get_request(request: urllib.request.Request) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_openai_client_raises_typed_errors(served: Served) -> None:
    client = _client(served)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "hi"}])
    assert bad.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "y = 2\n" * 1500}])
    assert long.value.code == "context_length_exceeded"
    assert _get(served.url + "/v1/nowhere")[0] == 404


def test_client_killed_mid_stream_frees_its_session_on_the_verifier(served: Served) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    for _attempt in range(3):
        ended = _kill_a_client_mid_stream(served, curl)
        if ended.get("length") != 1:  # else the generation ran to its end before the kill: again
            break
    assert ended == {"aborted": 1}  # closed by the edge's close message, not by an expiry


def _kill_a_client_mid_stream(served: Served, curl: str) -> dict[str, float]:
    """Kill a streaming client while its session lives on the verifier; wait for the verifier to
    free the session and return how its sessions ended meanwhile ({reason: count})."""
    body = json.dumps({"model": MODEL, "prompt": PROMPTS[5], "max_tokens": 900, "temperature": 0,
                       "stream": True})
    before = _scrape(served.metrics_port)
    process = subprocess.Popen([curl, "-sN", "-H", "Content-Type: application/json", "-d", body,
                                served.url + "/v1/completions"], stdout=subprocess.PIPE)
    assert process.stdout is not None
    seen = 0
    while seen < 3:  # a few rounds streamed: the session lives on the verifier
        if process.stdout.readline().startswith(b"data: {"):
            seen += 1
    live = _scrape(served.metrics_port)
    assert _sum(live, "specd_verifier_sessions") == 1 and _sum(live, "specd_verifier_kv_cache_bytes") > 0
    process.kill()  # the client dies mid-stream
    process.wait()
    deadline = time.monotonic() + 60  # the edge's verdict timeout; the redis session TTL is 600 s
    while time.monotonic() < deadline:
        now = _scrape(served.metrics_port)
        if _sum(now, "specd_verifier_sessions") == 0:
            break
        time.sleep(0.1)
    assert _sum(now, "specd_verifier_sessions") == 0
    assert _sum(now, "specd_verifier_kv_cache_bytes") == 0
    serve = _get(served.url + "/metrics")[1]
    assert b"specd_serve_client_disconnects_total 0.0" not in serve  # serve saw the client go
    finished = "specd_verifier_sessions_finished_total"
    reasons = {key.split("reason=")[1].split(",")[0].rstrip("}") for key in now if key.startswith(finished)}
    ended = {reason: _sum(now, finished, reason=reason) - _sum(before, finished, reason=reason)
             for reason in reasons}
    return {reason: count for reason, count in ended.items() if count}


# --------------------------------------------------------------------------- done means 4


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_web_page_streams_an_answer_with_figures_in_headless_chromium(served: Served, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    shot = Path(os.environ.get("SPECD_SERVE_SCREENSHOT", tmp_path / "serve-web.png"))
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(  # a fresh --user-data-dir
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
            viewport={"width": 1100, "height": 640},
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(served.url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'bundled:target'")
            page.fill("#max-tokens", "48")
            # Earlier turns fill the view: the answer ends at the bottom edge, above the input box.
            page.evaluate("document.getElementById('messages').insertAdjacentHTML('afterbegin', "
                          "'<div style=\"height: 2000px\"></div>')")
            page.fill("#prompt", "a stack class")
            page.click("#send")
            page.wait_for_function("document.getElementById('fig-status').textContent === 'done'",
                                   timeout=60_000)
            answer = page.inner_text(".msg.assistant")
            # Issue 21, item 12: the turn's figures line is scrolled into view, not under the input box.
            hidden_px = page.evaluate(
                "document.querySelector('.msg.assistant .figs').getBoundingClientRect().bottom"
                " - document.getElementById('messages').getBoundingClientRect().bottom")
            draft = page.locator(".msg.assistant span.draft").count()
            target = page.locator(".msg.assistant span.target").count()
            figures = {name: page.inner_text(f"#fig-{name}") for name in ("tokens", "rounds", "acceptance")}
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    expected = _client(served).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "a stack class"}], max_tokens=48, temperature=0)
    assert answer.startswith(expected.choices[0].message.content)
    assert target >= 1 and draft >= 1
    assert hidden_px <= 0, f"the figures line is {hidden_px} px below the messages' visible area"
    assert figures["tokens"] == "48" and int(figures["rounds"]) >= 1 and figures["acceptance"].endswith("%")
    assert shot.stat().st_size > 0


# --------------------------------------------------------------------------- start-up and stop


def test_serve_on_a_busy_port_fails_at_once_with_a_usage_error() -> None:
    """Issue 21, item 5: the port is checked before Redis and models; no URL printed as if listening."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "specd", "serve", "--port", str(port)],
                             env=_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in run.stderr and "--port" in run.stderr, run.stderr
    assert "http://" not in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) <= 2, run.stderr


def test_serve_exits_130_on_ctrl_c(tmp_path) -> None:
    """Issue 21, item 12: SIGINT is an interruption (130, the exit-code table); SIGTERM, a service
    manager's orderly stop, stays 0 (the served fixture checks that)."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "specd", "serve", "--port", str(port)], env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(f"http://127.0.0.1:{port}", [server])
    finally:
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=60)
    assert server.returncode == 130, err[-2000:]
    assert "Traceback" not in err


# --------------------------------------------------------------------------- specd chat


def test_specd_chat_streams_turns_with_history_on_the_embedded_default(target_greedy) -> None:
    env = _env()
    env["SPECD_SAMPLING__MAX_NEW_TOKENS"] = "24"
    chat = subprocess.run([sys.executable, "-m", "specd", "chat", "--log-level", "warning"],
                          input=b"def add\nand a test\n/quit\n", env=env, capture_output=True, timeout=180)
    assert chat.returncode == 0, chat.stderr.decode()[-2000:]
    out = chat.stdout.decode()
    replies = [line[len("specd> "):] for line in out.splitlines() if line.startswith("specd> ")]
    figures = [line for line in out.splitlines() if "tok/s" in line and "acceptance" in line]
    assert len(replies) == 2 and len(figures) == 2
    encode = target_greedy.tokenizer.encode
    first = target_greedy(encode('"""def add"""\n'), 24)
    second = target_greedy(encode(f'"""def add"""\n{first}\n"""and a test"""\n'), 24)
    transcript = out.split("specd> ")
    assert transcript[1].startswith(first) and transcript[2].startswith(second)  # history went in


# --------------------------------------------------------------------------- tenants


async def test_a_keys_tenant_reaches_the_pool_with_its_sessions(served: Served) -> None:
    """The runner behind an API key: its sessions carry the key's tenant on the verifier."""
    from common.settings import load_settings
    from specd.runtime import make_broker
    from specd.serve.command import build_context
    from specd.serve.runner import Finished
    from specd.serve.schemas import build_generation

    settings = load_settings({"redis": {"url": served.redis_url}, "models": {"torch_threads": 1}})
    broker = make_broker(settings)
    try:
        context = build_context(settings, broker, [])
        runner = context.runner
        generation = build_generation("completion", {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 8},
                                      context.defaults, runner.tokenizer)
        sid = runner.session_id("team-a")
        events = [event async for event in runner.rounds(generation, "team-a", sid)]
    finally:
        await broker.close()
    assert sid.startswith("team-a.") and isinstance(events[-1], Finished)
    assert events[-1].figures["tenant"] == "team-a" and events[-1].completion_tokens == 8
    opened = _sum(_scrape(served.metrics_port), "specd_verifier_sessions_opened_total", tenant="team-a")
    assert opened == 1
