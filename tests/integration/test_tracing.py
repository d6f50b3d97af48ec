"""One trace per session across processes: a real `specd verifier` and `specd edge` on a real Redis,
each writing its finished spans to a JSON-lines file; the edge's and the verifier's spans of the
session share one trace id, and the verifier's batched passes link to the sessions' rounds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("opentelemetry.sdk")

pytestmark = pytest.mark.integration


def _spans(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_for_line(process: subprocess.Popen[str], needle: str) -> None:
    assert process.stderr is not None
    for line in process.stderr:  # blocks on the verifier's own output: an event, not a sleep
        if needle in line:
            return
    raise AssertionError(f"the verifier exited before logging {needle!r}")


def test_a_session_is_one_trace_across_edge_and_verifier(redis_url, tiny_pair, tmp_path) -> None:
    env = {**os.environ, "SPECD_REDIS__URL": redis_url, "SPECD_REDIS__KEY_PREFIX": "trc",
           "SPECD_MODELS__TARGET": tiny_pair["target"], "SPECD_MODELS__DRAFT": tiny_pair["draft"],
           "SPECD_MODELS__TORCH_THREADS": "1", "SPECD_LOG__FORMAT": "json"}
    verifier_file, edge_file = tmp_path / "verifier.jsonl", tmp_path / "edge.jsonl"
    verifier = subprocess.Popen(
        [sys.executable, "-m", "specd", "verifier", "--worker-id", "v-trace"],
        env={**env, "SPECD_TRACING__FILE": str(verifier_file)}, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_line(verifier, "verifier.started")
        edge = subprocess.run(
            [sys.executable, "-m", "specd", "edge", "--prompt", "def fibonacci(n):",
             "--max-new-tokens", "24"],
            env={**env, "SPECD_TRACING__FILE": str(edge_file)}, capture_output=True, text=True, timeout=240)
        assert edge.returncode == 0, edge.stderr[-2000:]
    finally:
        verifier.send_signal(signal.SIGTERM)
        verifier.communicate(timeout=60)
    assert verifier.returncode == 0

    edge_spans, verifier_spans = _spans(edge_file), _spans(verifier_file)
    [session] = [s for s in edge_spans if s["name"] == "specd.session"]
    trace_id, rounds = session["trace_id"], session["attributes"]["specd.rounds"]
    edge_rounds = [s for s in edge_spans if s["name"] == "specd.edge.round"]
    verifier_rounds = [s for s in verifier_spans if s["name"] == "specd.verifier.round"]
    assert rounds > 1 and session["service"] == "specd-edge"
    assert len(edge_rounds) == rounds and {s["trace_id"] for s in edge_rounds} == {trace_id}
    assert {s["parent_span_id"] for s in edge_rounds} == {session["span_id"]}
    # The verifier's rounds of the session sit in the edge's trace, under its session span.
    assert len(verifier_rounds) == rounds
    assert {s["trace_id"] for s in verifier_rounds} == {trace_id}
    assert {s["parent_span_id"] for s in verifier_rounds} == {session["span_id"]}
    assert sorted(s["attributes"]["specd.seq"] for s in verifier_rounds) == list(range(rounds))
    # Each batched pass is its own trace, linked to the session rounds it verified.
    passes = [s for s in verifier_spans if s["name"] == "specd.verifier.pass"]
    linked = {link["span_id"] for p in passes for link in p["links"]}
    assert {s["span_id"] for s in verifier_rounds} <= linked
    assert all(p["trace_id"] != trace_id for p in passes)
