"""Tracing's pure parts: off costs nothing, the open carries a valid traceparent or none, spans nest."""

from __future__ import annotations

import numpy as np
import pytest

from common import tracing
from common.wire import SamplingSpec, SessionOpen, decode, encode


def _open(trace: str) -> bytes:
    return encode(SessionOpen("default.s1", np.array([1, 2], np.uint32), SamplingSpec(), "d", "fp",
                              trace=trace))


def test_tracing_off_returns_no_spans_and_no_ids() -> None:
    assert not tracing.enabled()
    span = tracing.start_span("x", "", seq=1)
    assert span is None and tracing.traceparent(span) == "" and tracing.log_ids(span) == {}
    tracing.end_span(span, accepted=2)  # a no-op


def test_open_carries_a_valid_traceparent_and_drops_an_invalid_one() -> None:
    good = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    assert decode(_open(good)).trace == good
    assert decode(_open("00-not-a-trace")).trace == ""  # ignored, as W3C asks: never an error
    assert b"trace" not in _open("")  # tracing off: nothing extra on the wire


def test_spans_nest_across_a_traceparent() -> None:
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    try:
        session = tracing.start_span("specd.session", session_id="s")
        parent = tracing.traceparent(session)
        remote = tracing.start_span("specd.verifier.round", parent, seq=0)  # as the verifier does
        tracing.end_span(remote)
        tracing.end_span(tracing.start_span("specd.verifier.pass", links=[tracing.traceparent(remote)]))
        tracing.end_span(session, rounds=1)
    finally:
        tracing.use_provider(None)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    trace_id = spans["specd.session"].context.trace_id
    assert spans["specd.verifier.round"].context.trace_id == trace_id
    assert spans["specd.verifier.round"].parent.span_id == spans["specd.session"].context.span_id
    round_id = spans["specd.verifier.round"].context.span_id
    assert spans["specd.verifier.pass"].links[0].context.span_id == round_id
    assert spans["specd.session"].attributes["specd.rounds"] == 1
    assert tracing.log_ids(parent)["trace_id"] == f"{trace_id:032x}"
