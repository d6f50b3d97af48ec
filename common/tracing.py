"""OpenTelemetry tracing: one trace per session, across edge, Redis and verifier (off by default).

The shape of a session's trace:
    ``specd.session`` (edge, the root; attributes: session id, tenant, rounds, tokens, finish)
      ``specd.edge.round`` (edge, one per round: draft, send, wait for the verdict, accept)
      ``specd.verifier.round`` (verifier, one per verified round of this session)
and, in the verifier's own trace, ``specd.verifier.pass`` (one batched forward pass) with a
*link* to each session round it verified, so a pass of many sessions joins every session's trace.

The edge puts the W3C ``traceparent`` of its session span in the session's open message; the
verifier parents its round spans on it. Log lines of a traced session carry ``trace_id`` and
``span_id`` (hex), so ``specd logs`` output and traces correlate.

Off (no endpoint, no file): every function here returns at once (``None`` spans), so a round
pays one attribute check. The OpenTelemetry SDK is imported only when tracing is turned on
(``pip install 'specd[tracing]'``). This module imports nothing of ours.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
"""W3C trace context: version 00, trace id, parent span id, flags."""

_tracer: Any = None
_provider: Any = None


class TracingUnavailable(Exception):
    """Tracing was asked for but the OpenTelemetry SDK is not installed."""


def enabled() -> bool:
    return _tracer is not None


def configure(service: str, otlp_endpoint: str = "", file: str = "") -> bool:
    """Turn tracing on for this process when an OTLP endpoint or a file is given; True if on.

    ``otlp_endpoint``: an OTLP/HTTP traces URL (e.g. http://127.0.0.1:4318/v1/traces).
    ``file``: append finished spans as JSON lines (a local record; tests and offline debugging).
    """
    global _tracer, _provider
    if not (otlp_endpoint or file) or _tracer is not None:
        return _tracer is not None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TracingUnavailable("tracing is configured but OpenTelemetry is not installed: "
                                 "pip install 'specd[tracing]'") from exc
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    if file:
        provider.add_span_processor(BatchSpanProcessor(_json_lines_exporter(file)))
    _provider, _tracer = provider, provider.get_tracer("specd")
    return True


def shutdown() -> None:
    """Flush and stop the exporters (a process calls it once on its way out)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def use_provider(provider: Any) -> None:
    """Trace into a given SDK ``TracerProvider`` (tests: an in-memory exporter); None: off."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer("specd") if provider is not None else None


# ------------------------------------------------------------------ spans


def start_span(name: str, parent: Any = "", links: Sequence[str] = (), start_ns: int | None = None,
               **attributes: Any) -> Any:
    """A started span (or None when tracing is off); ``parent``: a span of this process or a
    traceparent from another; ``links``: traceparents."""
    if _tracer is None:
        return None
    from opentelemetry.trace import Link, set_span_in_context

    if isinstance(parent, str):
        parent = _remote(parent) if parent else None
    context = set_span_in_context(parent) if parent is not None else None
    span_links = [Link(_remote(tp).get_span_context()) for tp in links if TRACEPARENT.fullmatch(tp)]
    return _tracer.start_span(name, context=context, links=span_links, start_time=start_ns,
                              attributes=_clean(attributes))


def end_span(span: Any, end_ns: int | None = None, **attributes: Any) -> None:
    if span is None:
        return
    if attributes:
        span.set_attributes(_clean(attributes))
    span.end(end_time=end_ns)


@contextmanager
def span(name: str, parent: Any = "", **attributes: Any) -> Iterator[Any]:
    """``start_span`` .. ``end_span`` around a block; an exception marks the span as an error."""
    current = start_span(name, parent, **attributes)
    try:
        yield current
    except BaseException as exc:
        if current is not None:
            from opentelemetry.trace import Status, StatusCode

            current.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:200]))
        raise
    finally:
        end_span(current)


def traceparent(span: Any) -> str:
    """The W3C traceparent of ``span`` ("" for None): what the open message carries."""
    if span is None:
        return ""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def log_ids(span_or_parent: Any) -> dict[str, str]:
    """``trace_id``/``span_id`` for log lines: of a span, or parsed from a traceparent string."""
    if isinstance(span_or_parent, str):
        match = TRACEPARENT.fullmatch(span_or_parent)
        return {"trace_id": match.group(1), "span_id": match.group(2)} if match else {}
    if span_or_parent is None:
        return {}
    ctx = span_or_parent.get_span_context()
    return {"trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}"}


def now_ns() -> int:
    return time.time_ns()


def _remote(parent: str) -> Any:
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    match = TRACEPARENT.fullmatch(parent)
    if match is None:
        return NonRecordingSpan(SpanContext(0, 0, is_remote=True))
    return NonRecordingSpan(SpanContext(int(match.group(1), 16), int(match.group(2), 16), is_remote=True,
                                        trace_flags=TraceFlags(TraceFlags.SAMPLED)))


def _clean(attributes: dict[str, Any]) -> dict[str, Any]:
    """OpenTelemetry takes str/bool/int/float (and sequences of them); None is dropped."""
    return {f"specd.{k}": v for k, v in attributes.items() if isinstance(v, str | bool | int | float)}


def _json_lines_exporter(path: str) -> Any:
    """A SpanExporter writing one JSON object per finished span (ids in hex, times in ns)."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    lock = threading.Lock()

    class JsonLinesExporter(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            lines = "".join(json.dumps(_span_record(s)) + "\n" for s in spans)
            with lock, open(path, "a", encoding="utf-8") as out:
                out.write(lines)
            return SpanExportResult.SUCCESS

    return JsonLinesExporter()


def _span_record(span: Any) -> dict[str, Any]:
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "name": span.name, "trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{parent.span_id:016x}" if parent is not None else None,
        "links": [{"trace_id": f"{link.context.trace_id:032x}", "span_id": f"{link.context.span_id:016x}"}
                  for link in span.links],
        "start_ns": span.start_time, "end_ns": span.end_time,
        "service": span.resource.attributes.get("service.name", ""),
        "attributes": dict(span.attributes or {}),
    }
