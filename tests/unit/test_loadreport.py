"""Load-test figures from synthetic events: percentiles, the broker-overhead join, the plan."""

from __future__ import annotations

import pytest

from specd.loadreport import PointData, percentiles, summarise_point, write_plots
from specd.loadtest import LoadTestOptions, _plan, split
from specd.prompts import read_prompts


def result(sid: str, round_ms: list[float]) -> dict:
    return {"session_id": sid, "tokens": 6, "rounds": 2, "drafted": 8, "accepted": 4, "tokens_per_s": 3.0,
            "first_token_ms": 10.0, "draft_ms": 2.0, "queue_ms": 4.0, "transport_ms": 2.0,
            "round_ms": round_ms}


def test_summary_joins_verifier_rounds_for_the_broker_overhead() -> None:
    point = PointData(sessions=2, gamma=4, edges=1, verifiers=1, wall_s=2.0,
                      results=[result("a", [10.0, 12.0]), result("b", [11.0, 13.0])],
                      tokens={"a": [(0.0, [1]), (0.1, [2, 3])]}, pings_ms=[0.5, 0.7])
    point.verifier_rounds = [
        {"session_id": s, "seq": q, "queue_ms": 2.0, "verify_ms": 6.0, "batch_size": 2}
        for s in "ab" for q in range(2)]
    summary = summarise_point(point)
    assert summary["tokens"] == 12 and summary["tokens_per_s"] == 6.0
    assert summary["acceptance_rate"] == 0.5 and summary["mean_accepted_length"] == 3.0
    assert summary["broker_overhead_ms"]["p50"] == 3.5  # median of (10, 11, 12, 13) - 8
    assert summary["verifier"]["forward_passes"] == 2
    assert summary["verifier"]["batch_size_histogram"] == {2: 2}
    assert summary["verifier"]["utilisation"] == 0.006  # 12 ms busy / 2 s
    assert summary["token_latency_ms"]["p50"] == 50.0  # 100 ms for 2 tokens


def test_percentiles_of_nothing_are_zero() -> None:
    assert percentiles([])["p99"] == 0.0 and percentiles([1.0, 2.0, 3.0])["p50"] == 2.0


def test_sessions_are_split_over_edges() -> None:
    assert split(10, 4) == [3, 3, 2, 2] and sum(split(7, 3)) == 7
    assert _plan(LoadTestOptions(edges=4), 32) == ([8, 8, 8, 8], [8, 8, 8, 8])
    assert _plan(LoadTestOptions(edges=4, duration_s=5.0), 2) == ([1, 1], [0, 0])
    assert _plan(LoadTestOptions(edges=4, prompts=2), 32) == ([16, 16], [1, 1])


def test_prompts_from_every_format(tmp_path) -> None:
    (tmp_path / "a.jsonl").write_text('{"turns": ["q1", "q2"]}\n{"text": "t"}\nplain line\n')
    (tmp_path / "b.json").write_text('[{"prompt": "def f():"}, {"prompt": "def g():"}]')
    assert read_prompts(tmp_path / "a.jsonl") == ["q1", "t", "plain line"]
    assert read_prompts(tmp_path / "b.json") == ["def f():", "def g():"]


def test_no_verifier_chart_without_verifier_figures(tmp_path) -> None:
    """Issue 21, item 12: `loadtest --no-verifiers` has no verifier figures: no empty batch chart."""
    pytest.importorskip("matplotlib")
    point = PointData(sessions=1, gamma=4, edges=1, verifiers=0, wall_s=1.0,
                      results=[result("a", [10.0, 12.0])], tokens={"a": [(0.0, [1]), (0.1, [2, 3])]})
    written = write_plots([summarise_point(point)], tmp_path)
    assert sorted(p.name for p in written) == ["acceptance.png", "latency.png", "throughput.png"]
