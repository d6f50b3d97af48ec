"""The HTTP routes: OpenAI's /v1 API, /health, /metrics and the web page at /.

Bodies are parsed and validated here (not by FastAPI's own models) so that every bad request
gets OpenAI's error object with the offending parameter named, whatever the framework would say.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from common.logs import get_logger
from specd.serve import errors
from specd.serve.context import ServeContext
from specd.serve.logprobs import LogprobFormat
from specd.serve.responses import ChunkWriter, full_response, response_id, usage
from specd.serve.runner import Finished, Round
from specd.serve.schemas import Generation, build_generation, parse_body

STATIC = Path(__file__).with_name("static")
log = get_logger("specd.serve")


class _Stream(StreamingResponse):
    """A streamed body whose clean-up runs however the response ends (a client gone included)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self._on_close()


def error_response(exc: errors.APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def create_app(context: ServeContext) -> FastAPI:
    app = FastAPI(title="specd serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.context = context
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(errors.APIError(exc.status_code, str(exc.detail), code=None))

    _info_routes(app, context)
    _api_routes(app, context)
    return app


def _info_routes(app: FastAPI, context: ServeContext) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            await context.runner.check_pool()
        except errors.APIError as exc:
            return JSONResponse({"status": "unavailable", "error": exc.message}, status_code=503)
        return JSONResponse({"status": "ok", "model": context.defaults.model,
                             "active": context.runner.active,
                             "max_concurrent": context.runner.max_concurrent,
                             "queued": context.runner.admission.waiting})

    @app.get("/metrics")
    async def metrics() -> Response:
        from specd.serve.metrics import exposition

        body = exposition([context.runner.metrics.registry, *context.registries])
        return Response(body, media_type="text/plain; version=0.0.4")


def _api_routes(app: FastAPI, context: ServeContext) -> None:

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        try:
            context.keys.tenant(request.headers.get("authorization"))
        except errors.APIError as exc:
            return error_response(exc)
        return JSONResponse({"object": "list", "data": [_model_card(context.defaults.model)]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> JSONResponse:
        try:
            context.keys.tenant(request.headers.get("authorization"))
            if name != context.defaults.model:
                raise errors.unknown_model(name, context.defaults.model)
        except errors.APIError as exc:
            return error_response(exc)
        return JSONResponse(_model_card(name))

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        return await _generate(context, request, "completion")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        return await _generate(context, request, "chat")


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "specd"}


async def _generate(context: ServeContext, request: Request, kind: Literal["completion", "chat"]) -> Response:
    runner, route, started = context.runner, request.url.path, time.perf_counter()
    try:
        tenant = context.keys.tenant(request.headers.get("authorization"))
        generation = build_generation(kind, parse_body(await request.body()), context.defaults,
                                      runner.tokenizer)
        release = await runner.acquire()  # at once, or after a wait in the queue
    except errors.APIError as exc:
        runner.metrics.request(route, exc.status)
        return error_response(exc)
    if await request.is_disconnected():  # gave up while queued: its slot goes to the next
        release()
        runner.metrics.request(route, 499)
        return Response(status_code=499)
    sid = runner.session_id(tenant)
    try:
        await runner.check_pool()
    except errors.APIError as exc:
        release()
        runner.metrics.request(route, exc.status)
        return error_response(exc)
    if generation.stream:  # the stream releases the slot when it ends, however it ends
        return _Stream(_chunks(context, generation, tenant, sid, route, started), release)
    try:
        return await _whole(context, generation, tenant, sid, route, started)
    except errors.APIError as exc:
        runner.metrics.request(route, exc.status)
        return error_response(exc)
    finally:
        release()


async def _whole(context: ServeContext, generation: Generation, tenant: str, sid: str, route: str,
                 started: float) -> JSONResponse:
    runner = context.runner
    finished: Finished | None = None
    async with contextlib.aclosing(runner.rounds(generation, tenant, sid)) as rounds:
        async for event in rounds:
            if isinstance(event, Finished):
                finished = event
    assert finished is not None  # rounds() ends with Finished or raises
    _observe(context, route, tenant, finished, started)
    used = usage(len(generation.prompt_ids), finished.completion_tokens)
    logprobs = None if finished.logprobs is None else LogprobFormat(
        runner.tokenizer, generation.tokens_as_ids).of(generation.kind, finished.logprobs)
    return JSONResponse(full_response(generation, response_id(generation, sid), finished.text,
                                      finished.finish_reason, used, finished.figures, logprobs))


async def _chunks(context: ServeContext, generation: Generation, tenant: str, sid: str, route: str,
                  started: float) -> AsyncIterator[bytes]:
    runner = context.runner
    writer = ChunkWriter(generation, response_id(generation, sid))
    format_ = LogprobFormat(runner.tokenizer, generation.tokens_as_ids)
    completed = False
    try:
        yield writer.start()
        async with contextlib.aclosing(runner.rounds(generation, tenant, sid)) as rounds:
            async for event in rounds:
                if isinstance(event, Round):
                    logprobs = None if event.logprobs is None else format_.of(generation.kind, event.logprobs)
                    yield writer.delta(event.delta, event.figures, logprobs)
                    continue
                _observe(context, route, tenant, event, started)
                yield writer.finish(event.finish_reason,
                                    usage(len(generation.prompt_ids), event.completion_tokens), event.figures)
        completed = True
    except errors.APIError as exc:
        runner.metrics.request(route, exc.status)
        completed = True
        yield writer.error(exc.body())
    finally:
        if not completed:  # the client went away mid-stream: its session was cancelled
            runner.metrics.disconnects.inc()
            runner.metrics.request(route, 499)
            log.info("serve.client_gone", session_id=sid, tenant=tenant)


def _observe(context: ServeContext, route: str, tenant: str, finished: Finished, started: float) -> None:
    metrics = context.runner.metrics
    metrics.request(route, 200)
    metrics.tokens.labels(tenant).inc(finished.completion_tokens)
    metrics.duration.observe(time.perf_counter() - started)
    if finished.figures.get("ttft_ms"):
        metrics.first_token.observe(finished.figures["ttft_ms"] / 1000)
    log.info("serve.request", route=route, **{k: v for k, v in finished.figures.items()},
             finish_reason=finished.finish_reason, completion_tokens=finished.completion_tokens)
