"""``specd serve``: its flags, and the process: Redis (embedded by default), the edge, uvicorn.

With no ``redis.url`` it starts an embedded Redis and an in-process verifier, like ``specd demo``;
with one it serves against the pool already running there. Imports of the web stack wait until
the command runs, so ``specd --help`` stays fast and works without the ``serve`` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

from common.settings import ConfigError, Settings
from specd.failures import EPILOG, INTERRUPTED
from specd.flags import HelpFormatter, add_setting_flags
from specd.signals import on_stop_signals


def add_parser(commands: Any) -> argparse.ArgumentParser:
    serve = commands.add_parser(
        "serve", formatter_class=HelpFormatter, epilog=EPILOG,
        help="OpenAI-compatible HTTP endpoint, with a web chat at /",
        description="Serve the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models), "
        "/health, /metrics and a web chat at /. Each request is one speculative session against "
        "the verifier pool; with no --redis-url an embedded Redis and an in-process verifier. "
        "See docs/serve.md.")
    add_setting_flags(serve, "serve", "common", "target", "batching", "draft")
    serve.set_defaults(handler=run)
    return serve


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        import fastapi  # noqa: F401  - fail with the install hint, not a traceback
        import uvicorn  # noqa: F401
    except ImportError as exc:
        print(f"specd serve: {exc.name} is missing: pip install 'specd[serve]'", file=sys.stderr)
        return 2
    from specd.runtime import check_models

    check_models(settings, target=not settings.redis.url, draft=True)
    with listen(settings.serve.host, settings.serve.port) as sock:  # before any model loads
        return asyncio.run(serve_forever(settings, sock))


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound now: a busy port is a usage error, not a crash after start-up."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise ConfigError(f"serve.port: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                          "give another --port, or stop what listens there") from None


async def serve_forever(settings: Settings, sock: socket.socket) -> int:
    import uvicorn

    from broker.reach import redacted
    from specd.generation import local_verifier, redis_url_for
    from specd.runtime import make_broker

    signal.signal(signal.SIGTERM, _exit_during_startup)  # until uvicorn runs: clean up, then exit
    async with redis_url_for(settings) as (url, embedded), contextlib.AsyncExitStack() as stack:
        registries = []
        broker = make_broker(settings, url)
        stack.push_async_callback(broker.close)
        if embedded:  # nobody else can reach an embedded Redis: verify here
            verifier = await stack.enter_async_context(local_verifier(settings, url))
            registries.append(verifier.metrics.registry)
            await _verifier_heartbeat(broker)
        context = build_context(settings, broker, registries)
        serve = settings.serve
        config = uvicorn.Config(create_app_for(context), host=serve.host, port=serve.port,
                                log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5)
        server = _Server(config)
        received = _stop_on_signals(server)
        where = "embedded, verifier in this process" if embedded else redacted(url)
        print(f"specd serve: http://{serve.host}:{sock.getsockname()[1]}/ (model {context.defaults.model}; "
              f"Redis {where})", file=sys.stderr, flush=True)
        await server.serve(sockets=[sock])
        await context.runner.wait_closed()  # cancelled sessions have told the verifier
    return INTERRUPTED if signal.SIGINT in received else 0


def _exit_during_startup(_signum: int, _frame: Any) -> None:
    raise SystemExit(143)  # unwinds through the embedded Redis and verifier clean-up


async def _verifier_heartbeat(broker: Any, timeout_s: float = 60.0) -> None:
    """Until the in-process verifier has announced itself (requests before would get 503)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await broker.any_healthy("verifier"):
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"the in-process verifier did not start within {timeout_s:.0f} s")
        await asyncio.sleep(0.05)


def build_context(settings: Settings, broker: Any, registries: list[Any]) -> Any:
    """The edge client (draft backend loaded once), its runner, limits and keys."""
    from edge_worker.client import EdgeClient
    from specd.runtime import build_draft_backend, edge_broker, edge_config
    from specd.serve.auth import KeyRing
    from specd.serve.context import ServeContext
    from specd.serve.runner import SessionRunner

    serve = settings.serve
    client = EdgeClient(build_draft_backend(settings), edge_broker(settings, broker),
                        edge_config(settings), serve.max_concurrent)
    runner = SessionRunner(client, broker, serve.max_concurrent, serve.pool_check_timeout_s,
                           serve.queue_size, serve.queue_timeout_s)
    return ServeContext(runner, defaults_for(settings, runner.tokenizer),
                        KeyRing(serve.api_keys, settings.edge.tenant),
                        [client.metrics.registry, *registries])


def create_app_for(context: Any) -> Any:
    from specd.serve.app import create_app

    return create_app(context)


def defaults_for(settings: Settings, tokenizer: Any) -> Any:
    from specd.serve.schemas import Defaults

    limits, sampling = settings.limits, settings.sampling
    model_max = int(getattr(tokenizer, "model_max_length", 0) or 0)
    context = settings.serve.context_tokens or (
        model_max if 0 < model_max < 10**7 else limits.max_prompt_tokens + limits.max_new_tokens)
    return Defaults(model=settings.serve.model_name or settings.models.target,
                    temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                    max_tokens=sampling.max_new_tokens, max_tokens_limit=limits.max_new_tokens,
                    context_tokens=context, prompt_tokens_limit=limits.max_prompt_tokens)


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn without its own signal handling: it re-raises the signal after shutdown,
        which would kill the process before the embedded Redis and verifier are stopped."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server


def _Server(config: Any) -> Any:  # reads as the class it builds
    return _server_class()(config)


def _stop_on_signals(server: Any) -> list[int]:
    """First SIGINT/SIGTERM: stop accepting, finish streams (5 s at most); second: at once.

    Returns the signals received: Ctrl-C ends in exit 130 (interrupted), SIGTERM (a service
    manager's orderly stop, after the streams finished) in 0."""
    received: list[int] = []

    def stop(sig: int) -> None:
        received.append(sig)
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    on_stop_signals(stop)
    return received
