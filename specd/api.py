"""specd as a Python library: speculative generation in one call, streamed as an iterator.

```python
import specd

result = specd.generate("def fibonacci(n):", max_new_tokens=32)       # the embedded default
print(result.text, result.acceptance_rate, result.tokens_per_s)
for chunk in specd.stream("class Stack:", max_new_tokens=32):
    print(chunk.text, end="")

with specd.Client() as client:        # keeps the draft model, Redis and verifier warm across calls
    first = client.generate("import os", max_new_tokens=16, temperature=0.8, seed=1)
    again = client.generate("import os", max_new_tokens=16, temperature=0.8, seed=1)  # the same text
```

A ``Client`` with no ``redis_url`` (and none configured) runs the embedded default, as ``specd
generate`` does: a private redis-server and a verifier worker in this process; with one it sends
sessions to the verifier pool there. It owns an event loop in a background thread, so its calls
are plain blocking calls from any thread (``asyncio`` code can run them with
``asyncio.to_thread``). ``close()`` (or leaving the ``with`` block) ends the verifier and stops
the embedded redis-server. The wiring is that of the ``specd generate`` command and
``specd.runtime``; this module only holds it open between calls.

Settings come as for every command (``settings.toml`` < ``SPECD_*`` < arguments): ``settings``
takes section dicts (``{"edge": {"gamma": 6}}``), and the arguments of ``Client`` override them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import queue
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Result:
    """One generation: the fields of ``specd generate --json`` (``to_dict()`` is that object)."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    finish_reason: str | None  # "stop" (an end-of-sequence token) or "length"
    tokens: int
    rounds: int
    drafted: int
    accepted: int
    acceptance_rate: float
    mean_accepted_length: float  # tokens per round (target forward pass)
    target_forward_passes: int
    tokens_per_s: float
    draft_ms: float
    queue_ms: float
    verify_ms: float
    transport_ms: float
    wall_ms: float
    first_token_ms: float
    seed: int
    session_id: str
    logprobs: list[Any] | None = None  # TokenLogprob per token when asked (``logprobs=n``)
    data: dict[str, Any] = field(default_factory=dict, repr=False)  # the whole --json object

    @classmethod
    def from_summary(cls, summary: dict[str, Any], logprobs: list[Any] | None) -> Result:
        named = {f.name for f in fields(cls)} - {"logprobs", "data"}
        return cls(**{name: summary[name] for name in named}, logprobs=logprobs, data=summary)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.data)


@dataclass(frozen=True)
class Chunk:
    """One verified round: its new text (whole characters only) and committed token ids."""

    text: str
    token_ids: list[int]
    logprobs: list[Any] | None = None  # TokenLogprob per token of the round, when asked


class Stream(Iterator[Chunk]):
    """The chunks of one generation as they are verified; ``result`` once it is exhausted.

    Leaving it early (``close()``, ``break`` out of a ``for`` then garbage collection, or the
    client's close) cancels the session: the verifier frees it at once."""

    def __init__(self, client: Client, prompt: str, options: dict[str, Any], owns_client: bool) -> None:
        self.result: Result | None = None
        self._client, self._owns = client, owns_client
        self._items: queue.Queue[Chunk | Result | BaseException] = queue.Queue()
        self._done = False
        self._future = client._submit(client._session(prompt, options, self._items.put))

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Chunk:
        if self._done:
            raise StopIteration
        item = self._items.get()
        if isinstance(item, Chunk):
            return item
        self._finish()
        if isinstance(item, BaseException):
            raise item
        self.result = item
        raise StopIteration

    def close(self) -> None:
        if not self._done:
            self._future.cancel()
            self._finish()

    def _finish(self) -> None:
        self._done = True
        if self._owns:
            self._client.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class Client:
    """Speculative generation against the embedded default or a pool; reusable, thread-safe."""

    def __init__(self, redis_url: str | None = None, *, target_model: str | None = None,
                 draft_model: str | None = None, settings: dict[str, dict[str, Any]] | None = None,
                 log_level: str = "warning") -> None:
        from common.logs import configure_logging
        from common.settings import load_settings

        sections = {name: dict(values) for name, values in (settings or {}).items()}
        for section, key, value in (("redis", "url", redis_url), ("models", "target", target_model),
                                    ("models", "draft", draft_model)):
            if value is not None:
                sections.setdefault(section, {})[key] = value
        self.settings = load_settings(sections)
        configure_logging(log_level)  # once per process: a no-op when the host configured it
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="specd-client", daemon=True)
        self._thread.start()
        self._stack = contextlib.AsyncExitStack()
        self._closed = False
        self._sessions: set[asyncio.Task[Any]] = set()
        try:
            self._edge, self.redis_url, self.embedded = self._run(self._open())
        except BaseException:
            self.close()
            raise

    async def _open(self) -> tuple[Any, str, bool]:
        from specd.generation import local_verifier, redis_url_for
        from specd.runtime import build_edge, open_broker
        from specd.serve.command import _verifier_heartbeat

        url, embedded = await self._stack.enter_async_context(redis_url_for(self.settings))
        if embedded:  # nobody else can reach an embedded Redis: verify here
            await self._stack.enter_async_context(local_verifier(self.settings, url))
        broker = await open_broker(self.settings, url)
        self._stack.push_async_callback(broker.close)
        if embedded:
            await _verifier_heartbeat(broker)
        return build_edge(self.settings, broker), url, embedded

    # ------------------------------------------------------------------ calls

    def generate(self, prompt: str, *, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                 logprobs: int | None = None) -> Result:
        """Generate for ``prompt`` (unset options: the ``[sampling]`` settings; ``logprobs=n``: the
        target's logprob of each token and its top n alternatives, in ``Result.logprobs``)."""
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       top_k=top_k, seed=seed, logprobs=logprobs)
        return self._run(self._session(prompt, options, None))

    def stream(self, prompt: str, **options: Any) -> Stream:
        """As ``generate``, as an iterator of ``Chunk`` per verified round (``.result`` at the end)."""
        return Stream(self, prompt, options, owns_client=False)

    async def _session(self, prompt: str, options: dict[str, Any], emit: Any) -> Result:
        from specd.generation import speculative_summary
        from specd.serve.text import TextStream
        from specd.workers import sampling_spec

        tokenizer = self._edge.backend.tokenizer
        spec = sampling_spec(self.settings, self._edge.backend.eos_token_ids)
        spec = replace(spec, **{k: v for k, v in options.items() if v is not None and k != "logprobs"})
        text, top = TextStream(tokenizer), options.get("logprobs")
        pending: list[Any] = []

        def on_tokens(_sid: str, tokens: list[int]) -> None:
            if emit is not None:
                lps = pending[:len(tokens)] if top is not None else None
                del pending[:len(tokens)]
                emit(Chunk(text.push(tokens, len(tokens) - 1).text, list(tokens), lps))

        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        try:
            result = await self._edge.generate(
                tokenizer.encode(prompt), spec, on_tokens, logprobs=top,
                on_logprobs=None if emit is None else lambda _sid, lps: pending.extend(lps))
        except BaseException as exc:
            if emit is not None:
                emit(exc)
            raise
        finally:
            self._sessions.discard(task)
        if emit is not None and (tail := text.finish().text):
            emit(Chunk(tail, [], [] if top is not None else None))
        final = Result.from_summary(speculative_summary(self.settings, result, tokenizer, self.redis_url,
                                                        self.embedded), result.logprobs)
        if emit is not None:
            emit(final)
        return final

    # ------------------------------------------------------------------ the loop thread

    def _submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        if self._closed:
            coroutine.close()
            raise RuntimeError("this specd.Client is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future = self._submit(coroutine)
        try:
            return future.result()
        except BaseException:  # Ctrl-C while waiting: the session is cancelled (closed on the pool)
            future.cancel()
            raise

    def close(self) -> None:
        """End every session, the in-process verifier and the embedded Redis (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        # The verifier's KV arena (GBs) sits in reference cycles (worker, metrics callbacks, tasks):
        # free it now rather than at some later cyclic collection.
        self._edge = None
        gc.collect()

    async def _shutdown(self) -> None:
        """Sessions still running are cancelled (each tells the pool), then what ``_open`` started."""
        from specd.generation import cancel_until_done

        for task in list(self._sessions):
            await cancel_until_done(task)
        await self._stack.aclose()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def generate(prompt: str, *, redis_url: str | None = None, target_model: str | None = None,
             draft_model: str | None = None, settings: dict[str, dict[str, Any]] | None = None,
             **options: Any) -> Result:
    """One speculative generation with a client of its own (started, then closed)."""
    with Client(redis_url, target_model=target_model, draft_model=draft_model, settings=settings) as client:
        return client.generate(prompt, **options)


def stream(prompt: str, *, redis_url: str | None = None, target_model: str | None = None,
           draft_model: str | None = None, settings: dict[str, dict[str, Any]] | None = None,
           **options: Any) -> Stream:
    """``generate`` as an iterator of chunks; its client closes when the stream ends or is closed."""
    client = Client(redis_url, target_model=target_model, draft_model=draft_model, settings=settings)
    try:
        return Stream(client, prompt, options, owns_client=True)
    except BaseException:
        client.close()
        raise
