"""``specd generate``: one prompt, speculative (through Redis) or target-only or draft-only."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from broker.embedded import EmbeddedRedis
from broker.reach import redacted, require_verifier
from common.logs import get_logger
from common.models import encode_prompt, load_causal_lm, set_torch_threads
from common.prompt_limits import prompt_problem
from common.sampling import SamplingParams, apply_stop_rules
from common.settings import Settings, context_length
from edge_worker.client import SessionResult
from specd.prompts import PromptError
from specd.runtime import (
    backend_context,
    build_draft_backend,
    build_edge,
    build_verifier,
    check_models,
    draft_gamma,
    open_broker,
    require_standalone,
)
from specd.workers import sampling_spec
from verifier_worker.engine import TargetEngine, generate_target_only

log = get_logger("specd.generation")


@contextlib.asynccontextmanager
async def redis_url_for(settings: Settings) -> AsyncIterator[tuple[str, bool]]:
    """The configured Redis URL, or an embedded Redis for the duration (url, embedded?)."""
    if settings.redis.url:
        yield settings.redis.url, False
        return
    with EmbeddedRedis() as embedded:  # stopped on every exit path; dies with us on SIGKILL too
        # Private to this command (loopback, random password, dies with it): there is no other
        # client whose reach an ACL would bound, so the verifier's ACL warning would only be noise.
        settings.verifier.acl_check = "off"
        # A fresh secret per run, shared only in process and with child processes' environments
        # (specd demo), never through Redis: sessions are authenticated without configuration.
        if not settings.redis.verdict_secret:
            settings.redis.verdict_secret = secrets.token_urlsafe(32)
        yield embedded.url, True


@contextlib.asynccontextmanager
async def local_verifier(settings: Settings, url: str) -> AsyncIterator[Any]:
    """A verifier worker running as a task in this process until the block exits."""
    broker = await open_broker(settings, url)
    try:
        worker = build_verifier(settings, broker)
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            yield worker
        except BaseException:  # interrupted or failed: nobody is left to serve, do not drain
            await cancel_until_done(task)
            raise
        stop.set()
        await task
    finally:
        await broker.close()


async def cancel_until_done(task: asyncio.Task[Any], every_s: float = 0.5) -> None:
    """Cancel ``task`` and wait for it, cancelling again while it runs on.

    A cancellation can be lost inside a client library (seen: a verifier task blocked in a
    redis-py read went on serving after its cancel, 1 Ctrl-C in 3 during start-up), and one lost
    cancel would hang the command for good; a repeated one costs nothing.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every_s)
    if not task.cancelled() and task.exception() is not None:
        log.warning("verifier.stopped_with_error", error=repr(task.exception()))


async def speculative(settings: Settings, prompt: str, stream: bool, chat: bool = False) -> dict[str, Any]:
    async with redis_url_for(settings) as (url, embedded), contextlib.AsyncExitStack() as stack:
        if embedded:  # nobody else can reach an embedded Redis: serve it ourselves
            await stack.enter_async_context(local_verifier(settings, url))
        broker = await open_broker(settings, url)
        stack.push_async_callback(broker.close)
        if not embedded:  # the pool's: is anyone serving it? (before the draft loads)
            await require_verifier(broker, url, settings.redis.startup_wait_s)
        client = build_edge(settings, broker)
        tokenizer = client.backend.tokenizer
        spec = sampling_spec(settings, client.backend.eos_token_ids)

        def on_tokens(_sid: str, tokens: list[int]) -> None:
            if stream:
                print(tokenizer.decode(tokens, skip_special_tokens=True), end="", flush=True)

        if stream:
            print(prompt, end="\n" if chat else "", flush=True)
        result = await client.generate(encode_prompt(tokenizer, prompt, chat), spec, on_tokens)
        if stream:
            print(flush=True)
        return speculative_summary(settings, result, tokenizer, url, embedded)


def speculative_summary(settings: Settings, result: SessionResult, tokenizer: Any, url: str,
                        embedded: bool) -> dict[str, Any]:
    """What ``generate --json`` prints for a speculative session (and the Python API returns)."""
    summary = result.summary()
    summary.update(mode="speculative", gamma=draft_gamma(settings),
                   text=tokenizer.decode(result.token_ids, skip_special_tokens=True),
                   redis="embedded" if embedded else redacted(url))
    return summary


def target_only(settings: Settings, prompt: str, chat: bool = False) -> dict[str, Any]:
    models = settings.models
    target = load_causal_lm(models.target, models.dtype, models.target_device, models.trust_remote_code,
                            cache_dir=settings.edge.cache_dir)
    spec = sampling_spec(settings, target.eos_token_ids)
    prompt_ids = encode_prompt(target.tokenizer, prompt, chat)
    check_local_prompt(prompt_ids, spec.max_new_tokens, context_length(target.model.config), "models.target")
    # One session: a KV arena of its own length (not a pool's budget), warmed on a throw-away
    # prompt of the same length before the clock starts, so a fresh process runs at warm speed.
    engine = TargetEngine(target.model, target.vocab_size,
                          kv_budget_tokens=max(1024, 2 * (len(prompt_ids) + spec.max_new_tokens)))
    engine.warm_up(prompt_tokens=len(prompt_ids), gamma=0)
    started = time.perf_counter()
    stops = frozenset(spec.stop_token_ids)
    tokens = generate_target_only(engine, prompt_ids, SamplingParams(
        spec.temperature, spec.top_p, spec.top_k, spec.seed), stops, spec.max_new_tokens)
    return _plain_summary("target", target.tokenizer, prompt_ids, tokens, started,
                          engine.forward_passes, spec.seed, _finish(tokens, stops, spec.max_new_tokens))


def draft_only(settings: Settings, prompt: str, chat: bool = False) -> dict[str, Any]:
    backend = build_draft_backend(settings)
    require_standalone(backend, settings.models.draft)
    spec = sampling_spec(settings, backend.eos_token_ids)
    params = SamplingParams.of(spec)
    prompt_ids = encode_prompt(backend.tokenizer, prompt, chat)
    check_local_prompt(prompt_ids, spec.max_new_tokens, backend_context(backend), "models.draft")
    state, context = backend.new_state(), list(prompt_ids)
    tokens: list[int] = []
    finish: str | None = None
    started = time.perf_counter()
    for seq in range(spec.max_new_tokens):
        proposal = backend.propose(state, context, 1, params, seq, frozenset(spec.stop_token_ids),
                                   settings.edge.max_support)
        kept, finish = apply_stop_rules(proposal.token_ids, len(tokens),
                                        frozenset(spec.stop_token_ids), spec.max_new_tokens)
        tokens.extend(kept)
        context.extend(kept)
        if finish:
            break
    return _plain_summary("draft", backend.tokenizer, prompt_ids, tokens, started, 0, spec.seed, finish)


def _finish(tokens: list[int], stops: frozenset[int], max_new_tokens: int) -> str | None:
    """The finish reason of a finished generation, by the stop rules every mode applies."""
    return "stop" if tokens and tokens[-1] in stops else "length" if len(tokens) >= max_new_tokens else None


def check_local_prompt(prompt_ids: list[int], max_new_tokens: int, context: int, model: str) -> None:
    """Target-only and draft-only runs check the prompt as a session open would."""
    problem = prompt_problem(len(prompt_ids), max_new_tokens, context, model)
    if problem:
        raise PromptError(problem)


def _plain_summary(mode: str, tokenizer: Any, prompt_ids: list[int], tokens: list[int],
                   started: float, passes: int, seed: int, finish_reason: str | None) -> dict[str, Any]:
    """The speculative summary's fields; nothing was drafted and verified, so acceptance is null."""
    wall_ms = (time.perf_counter() - started) * 1000
    return {
        "mode": mode, "prompt_ids": prompt_ids, "token_ids": tokens, "tokens": len(tokens),
        "text": tokenizer.decode(tokens, skip_special_tokens=True), "finish_reason": finish_reason,
        "rounds": len(tokens), "drafted": 0, "accepted": 0, "acceptance_rate": None,
        "mean_accepted_length": 1.0,
        "target_forward_passes": passes, "seed": seed, "wall_ms": round(wall_ms, 3),
        "tokens_per_s": round(len(tokens) / (wall_ms / 1000), 2) if wall_ms else 0.0,
        "draft_ms": 0.0, "queue_ms": 0.0, "verify_ms": 0.0, "transport_ms": 0.0,
    }


def run_generate(settings: Settings, prompt: str, mode: str, as_json: bool,
                 chat: bool = False) -> dict[str, Any]:
    """``chat``: the prompt is one user message, sent through the model's chat template."""
    check_models(settings, target=mode == "target" or (mode == "speculative" and not settings.redis.url),
                 draft=mode != "target")
    threads = thread_policy(settings)
    if mode == "speculative":
        result = asyncio.run(speculative(settings, prompt, stream=not as_json, chat=chat))
    elif mode == "target":
        result = target_only(settings, prompt, chat)
    elif mode == "draft":
        result = draft_only(settings, prompt, chat)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return {**result, "torch_threads": threads}


def thread_policy(settings: Settings) -> int:
    """One torch thread count for every mode, so that a baseline and a speculative run compare.

    ``models.torch_threads``, or 1 when it is 0: the library default (every core) made target-only
    runs 4-29x slower on a busy machine than with one thread, while the speculative pipeline
    shares its process between verifier and edge; a user read a speedup that was thread
    contention. Applied before any model loads; the in-process verifier and edge apply it again.
    """
    threads = settings.models.torch_threads or 1
    settings.models.torch_threads = threads
    set_torch_threads(threads)
    return threads


def print_human(result: dict[str, Any], prompt: str) -> None:
    if result["mode"] != "speculative":
        print(prompt + result["text"])
    fields = ["mode", "tokens", "rounds", "drafted", "accepted", "acceptance_rate",
              "mean_accepted_length", "target_forward_passes", "tokens_per_s", "wall_ms",
              "draft_ms", "queue_ms", "verify_ms", "transport_ms", "seed", "torch_threads"]
    print("  ".join(f"{name}={result[name]}" for name in fields if name in result), file=sys.stderr)
