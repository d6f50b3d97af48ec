"""``specd chat``: an interactive terminal chat, streamed, with history and per-turn figures.

Runs the same session runner as ``specd serve`` (chat template, stop rules, figures) in this
process: against the embedded default (embedded Redis, in-process verifier) or the pool at
``--redis-url``. ``/reset`` forgets the history, ``/quit`` or end of input leaves; Ctrl-C during
an answer stops it (its session is closed on the verifier), at the prompt it leaves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading
from typing import Any, TextIO

from common.settings import Settings
from specd.failures import EPILOG
from specd.flags import HelpFormatter, add_setting_flags

PROMPT = "you> "
REPLY = "specd> "


def add_parser(commands: Any) -> argparse.ArgumentParser:
    chat = commands.add_parser(
        "chat", formatter_class=HelpFormatter, epilog=EPILOG,
        help="interactive terminal chat (streamed, history, per-turn figures)",
        description="Chat with the target model through speculative decoding: the answer streams "
        "as it is verified; after each turn its figures (tokens/s, acceptance, tokens per round). "
        "/reset forgets the history, /quit leaves. Embedded Redis and verifier unless --redis-url.")
    chat.add_argument("--system", default="", help="a system message opening the conversation")
    add_setting_flags(chat, "common", "target", "batching", "draft")
    chat.set_defaults(handler=run)
    return chat


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return asyncio.run(chat_loop(settings, args.system, sys.stdin, sys.stdout))
    except KeyboardInterrupt:
        return 130


async def chat_loop(settings: Settings, system: str, stdin: TextIO, out: TextIO) -> int:
    from broker.reach import redacted, require_verifier
    from specd.generation import local_verifier, redis_url_for
    from specd.runtime import check_models, make_broker
    from specd.serve.command import build_context

    check_models(settings, target=not settings.redis.url, draft=True)
    async with redis_url_for(settings) as (url, embedded), contextlib.AsyncExitStack() as stack:
        if embedded:
            await stack.enter_async_context(local_verifier(settings, url))
        broker = make_broker(settings, url)
        stack.push_async_callback(broker.close)
        if not embedded:  # the pool's: is anyone serving it? (before the draft loads)
            await require_verifier(broker, url, settings.redis.startup_wait_s)
        context = build_context(settings, broker, [])
        stack.push_async_callback(context.runner.wait_closed)
        print(f"specd chat: {context.defaults.model} (Redis {'embedded' if embedded else redacted(url)}); "
              "/reset forgets, /quit leaves", file=out, flush=True)
        interrupted = await _converse(context, system, stdin, out)
    return 130 if interrupted else 0  # Ctrl-C at the prompt: interrupted (the exit-code table)


class _Lines:
    """Input lines from a daemon thread (a blocked read must not keep the process alive at exit)."""

    def __init__(self, stdin: TextIO) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.stdin = stdin
        threading.Thread(target=self._pump, daemon=True, name="chat-stdin").start()

    def _pump(self) -> None:
        for line in iter(self.stdin.readline, ""):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, line)
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    def leave(self) -> None:
        self.queue.put_nowait(None)


async def _converse(context: Any, system: str, stdin: TextIO, out: TextIO) -> bool:
    """The conversation; True when Ctrl-C at the prompt ended it."""
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    lines, turn, interrupted = _Lines(stdin), None, False

    def interrupt() -> None:  # Ctrl-C: stop the answer being written, or leave at the prompt
        nonlocal interrupted
        if turn is not None and not turn.done():
            turn.cancel()
        else:
            interrupted = True
            lines.leave()

    with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals off the main thread
        lines.loop.add_signal_handler(signal.SIGINT, interrupt)
    while (line := await _read(lines, stdin, out)) is not None:
        text = line.strip()
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            del history[bool(system):]
            print("(history cleared)", file=out, flush=True)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        turn = asyncio.create_task(_turn(context, history, out))
        with contextlib.suppress(asyncio.CancelledError):
            reply = await turn
        if turn.cancelled() or reply is None:
            history.pop()  # stopped or failed: the question is not part of the conversation
        else:
            history.append({"role": "assistant", "content": reply})
    return interrupted


async def _read(lines: _Lines, stdin: TextIO, out: TextIO) -> str | None:
    print(PROMPT, end="", file=out, flush=True)
    line = await lines.queue.get()
    if line is None:
        print(file=out)
        return None
    if not stdin.isatty():
        print(line.rstrip("\n"), file=out)  # echo piped input so the transcript reads as a chat
    return line


async def _turn(context: Any, history: list[dict[str, str]], out: TextIO) -> str | None:
    """Stream one answer; drop the oldest exchanges while the conversation is over the context."""
    from specd.serve.errors import APIError
    from specd.serve.runner import Finished, Round
    from specd.serve.schemas import build_generation

    runner = context.runner
    while True:
        try:
            generation = build_generation("chat", {"model": context.defaults.model, "messages": history},
                                          context.defaults, runner.tokenizer)
            break
        except APIError as exc:
            first = 1 if history[0]["role"] == "system" else 0
            if exc.code != "context_length_exceeded" or len(history) - first < 3:
                print(f"error: {exc.message}", file=out, flush=True)
                return None
            del history[first:first + 2]  # forget the oldest question and answer
    print(REPLY, end="", file=out, flush=True)
    tenant = context.keys.default_tenant
    sid = runner.session_id(tenant)
    try:
        async with contextlib.aclosing(runner.rounds(generation, tenant, sid)) as rounds:
            async for event in rounds:
                if isinstance(event, Round):
                    print(event.delta.text, end="", file=out, flush=True)
                elif isinstance(event, Finished):
                    print(f"\n{figures_line(event)}", file=out, flush=True)
                    return event.text
    except APIError as exc:
        print(f"\nerror: {exc.message}", file=out, flush=True)
    except asyncio.CancelledError:  # Ctrl-C: rounds() has closed the session on the verifier
        print("\n(stopped)", file=out, flush=True)
        raise
    return None


def figures_line(finished: Any) -> str:
    f = finished.figures
    acceptance = "n/a" if f.get("acceptance_rate") is None else f"{100 * f['acceptance_rate']:.1f}%"
    return (f"  [{finished.completion_tokens} tokens in {f['wall_ms'] / 1000:.2f} s, "
            f"{f['tokens_per_s']:.1f} tok/s, acceptance {acceptance}, "
            f"{f['tokens_per_round']:.2f} tokens/round, {f['target_forward_passes']} target passes, "
            f"first token {f['ttft_ms']:.0f} ms, finish {finished.finish_reason}]")
