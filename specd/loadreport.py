"""Load-test figures: from edge events, verifier log lines and Redis pings to a report, table, charts."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np


def percentiles(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0, "p99": 0.0}
    arr = np.asarray(values, dtype=np.float64)
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {"n": int(arr.size), "mean": round(float(arr.mean()), 3), "p50": round(float(p50), 3),
            "p95": round(float(p95), 3), "p99": round(float(p99), 3)}


@dataclass
class PointData:
    """Everything one load-test point collected."""

    sessions: int  # concurrent session slots
    gamma: int
    edges: int
    results: list[dict[str, Any]] = field(default_factory=list)
    tokens: dict[str, list[tuple[float, list[int]]]] = field(default_factory=dict)  # sid -> (t, ids)
    errors: list[dict[str, Any]] = field(default_factory=list)
    pings_ms: list[float] = field(default_factory=list)
    verifier_rounds: list[dict[str, Any]] | None = None  # None: the pool's logs are not ours
    verifiers: int = 0
    started: float = 0.0  # wall clock (time.time) of "go"
    wall_s: float = 0.0
    verdict_reads: int = 0


def read_verifier_rounds(paths: list[Path], since: float, until: float) -> list[dict[str, Any]]:
    """``verify.round`` JSON log lines stamped within [since, until] (epoch seconds)."""
    rounds = []
    for path in paths:
        if not path.is_file():
            continue
        with path.open(errors="replace") as f:
            for line in f:
                if '"verify.round"' not in line:
                    continue
                try:
                    record = json.loads(line)
                    stamp = datetime.fromisoformat(record["timestamp"]).timestamp()
                except (ValueError, KeyError):
                    continue
                if since <= stamp <= until:
                    rounds.append(record)
    return rounds


def _token_latencies(tokens: dict[str, list[tuple[float, list[int]]]]) -> list[float]:
    """Inter-token time: the gap between a session's successive token events over their size."""
    values: list[float] = []
    for events in tokens.values():
        for (before, _), (now, ids) in itertools.pairwise(events):
            if ids:
                values.extend([(now - before) * 1000 / len(ids)] * len(ids))
    return values


def _verifier_figures(rounds: list[dict[str, Any]], wall_s: float, verifiers: int,
                      tokens: int) -> dict[str, Any]:
    passes = sum(1 / r["batch_size"] for r in rounds)
    busy_ms = sum(r["verify_ms"] / r["batch_size"] for r in rounds)
    histogram = Counter()  # type: Counter[int]
    for r in rounds:
        histogram[int(r["batch_size"])] += 1
    per_pass = {size: round(count / size) for size, count in sorted(histogram.items())}
    return {
        "forward_passes": round(passes),
        "forward_passes_per_token": round(passes / tokens, 4) if tokens else 0.0,
        "batch_size_histogram": per_pass,
        "mean_batch_size": round(len(rounds) / passes, 3) if passes else 0.0,
        "utilisation": round(busy_ms / 1000 / (wall_s * max(verifiers, 1)), 4) if wall_s else 0.0,
        "verify_ms_per_round": percentiles([r["verify_ms"] for r in rounds]),
    }


def _broker_overhead(results: list[dict[str, Any]], rounds: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Per round: edge round trip minus verifier queueing and compute (joined on session, seq)."""
    if rounds:
        timing = {(r["session_id"], r["seq"]): (r["queue_ms"], r["verify_ms"]) for r in rounds}
        values = [rt - timing[(res["session_id"], seq)][0] - timing[(res["session_id"], seq)][1]
                  for res in results for seq, rt in enumerate(res.get("round_ms", []))
                  if (res["session_id"], seq) in timing]
        if values:
            return {"source": "per round (edge round trip - verifier queue - verify)", **percentiles(values)}
    values = [r["transport_ms"] / r["rounds"] for r in results if r["rounds"]]
    return {"source": "per-session mean transport_ms / rounds", **percentiles(values)}


def summarise_point(point: PointData) -> dict[str, Any]:
    results = point.results
    tokens = sum(r["tokens"] for r in results)
    rounds = sum(r["rounds"] for r in results)
    drafted = sum(r["drafted"] for r in results)
    accepted = sum(r["accepted"] for r in results)
    summary: dict[str, Any] = {
        "sessions": point.sessions, "gamma": point.gamma, "edges": point.edges,
        "completed_sessions": len(results), "error_count": len(point.errors),
        "errors": dict(Counter(e.get("code", "unknown") for e in point.errors)),
        "tokens": tokens, "rounds": rounds, "wall_s": round(point.wall_s, 3),
        "tokens_per_s": round(tokens / point.wall_s, 2) if point.wall_s else 0.0,
        "tokens_per_s_per_session": percentiles([r["tokens_per_s"] for r in results]),
        "token_latency_ms": percentiles(_token_latencies(point.tokens)),
        "round_latency_ms": percentiles([x for r in results for x in r.get("round_ms", [])]),
        "ttft_ms": percentiles([r["first_token_ms"] for r in results]),
        "draft_ms_per_round": round(sum(r["draft_ms"] for r in results) / rounds, 3) if rounds else 0.0,
        "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
        "mean_accepted_length": round(tokens / rounds, 4) if rounds else 0.0,
        "rounds_per_token": round(rounds / tokens, 4) if tokens else 0.0,
        "redis_rtt_ms": percentiles(point.pings_ms),
        "broker_overhead_ms": _broker_overhead(results, point.verifier_rounds),
        "verdict_reads": point.verdict_reads,
    }
    if point.verifier_rounds is not None:
        summary["verifier"] = _verifier_figures(point.verifier_rounds, point.wall_s, point.verifiers, tokens)
        summary["queue_ms"] = percentiles([r["queue_ms"] for r in point.verifier_rounds])
    else:
        summary["verifier"] = None
        summary["queue_ms"] = percentiles([r["queue_ms"] / r["rounds"] for r in results if r["rounds"]])
    return summary


COLUMNS = [
    ("sess", 5, lambda p: p["sessions"]), ("gam", 3, lambda p: p["gamma"]),
    ("done", 5, lambda p: p["completed_sessions"]), ("err", 4, lambda p: p["error_count"]),
    ("tok/s", 8, lambda p: f"{p['tokens_per_s']:.1f}"),
    ("tok/s/ses", 9, lambda p: f"{p['tokens_per_s_per_session']['mean']:.1f}"),
    ("tok p50/p95/p99 ms", 20, lambda p: _triple(p["token_latency_ms"])),
    ("round p50/p95/p99 ms", 20, lambda p: _triple(p["round_latency_ms"])),
    ("ttft p50/p95 ms", 15, lambda p: f"{p['ttft_ms']['p50']:.0f}/{p['ttft_ms']['p95']:.0f}"),
    ("acc%", 5, lambda p: f"{100 * p['acceptance_rate']:.1f}"),
    ("len/rnd", 7, lambda p: f"{p['mean_accepted_length']:.2f}"),
    ("fwd/tok", 7, lambda p: f"{p['verifier']['forward_passes_per_token']:.3f}" if p["verifier"] else "-"),
    ("batch", 6, lambda p: f"{p['verifier']['mean_batch_size']:.1f}" if p["verifier"] else "-"),
    ("util%", 5, lambda p: f"{100 * p['verifier']['utilisation']:.0f}" if p["verifier"] else "-"),
    ("queue p50", 9, lambda p: f"{p['queue_ms']['p50']:.1f}"),
    ("broker p50", 10, lambda p: f"{p['broker_overhead_ms']['p50']:.2f}"),
    ("rtt p50", 7, lambda p: f"{p['redis_rtt_ms']['p50']:.2f}"),
]


def _triple(stats: dict[str, Any]) -> str:
    return f"{stats['p50']:.1f}/{stats['p95']:.1f}/{stats['p99']:.1f}"


def print_table(points: list[dict[str, Any]], out: TextIO) -> None:
    print("  ".join(name.rjust(width) for name, width, _ in COLUMNS), file=out)
    for point in points:
        print("  ".join(str(get(point)).rjust(width) for _, width, get in COLUMNS), file=out)
    for point in points:
        if point["verifier"]:
            print(f"sessions={point['sessions']} gamma={point['gamma']}: verifier batch sizes "
                  f"(size: passes) {point['verifier']['batch_size_histogram']}", file=out)
        if point["errors"]:
            print(f"sessions={point['sessions']} gamma={point['gamma']}: errors {point['errors']}", file=out)


def write_plots(points: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Throughput and latency against sessions, acceptance against gamma, batch sizes (PNG).

    The batch-size chart only when some point has verifier figures: with ``--no-verifiers`` the
    pool's logs are not ours, and an empty chart would read as a pool that never batched."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'specd[bench]'") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    charts = [("throughput", _draw_throughput), ("latency", _draw_latency), ("acceptance", _draw_acceptance)]
    if any(p["verifier"] and p["verifier"]["batch_size_histogram"] for p in points):
        charts.append(("batch_sizes", _draw_batches))
    for name, draw in charts:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        draw(ax, points)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _by(points: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    return sorted(points, key=lambda p: (p[key], p["gamma"] if key != "gamma" else p["sessions"]))


def _draw_throughput(ax: Any, points: list[dict[str, Any]]) -> None:
    for gamma in sorted({p["gamma"] for p in points}):
        pts = _by([p for p in points if p["gamma"] == gamma], "sessions")
        xs = [p["sessions"] for p in pts]
        ax.plot(xs, [p["tokens_per_s"] for p in pts], "o-", label=f"total, γ={gamma}")
        ax.plot(xs, [p["tokens_per_s_per_session"]["mean"] for p in pts], "s--",
                label=f"per session, γ={gamma}")
    ax.set(xlabel="concurrent sessions", ylabel="generated tokens/s", title="Throughput against sessions")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _draw_latency(ax: Any, points: list[dict[str, Any]]) -> None:
    for gamma in sorted({p["gamma"] for p in points}):
        pts = _by([p for p in points if p["gamma"] == gamma], "sessions")
        xs = [p["sessions"] for p in pts]
        for key, label in (("round_latency_ms", "round"), ("token_latency_ms", "per token")):
            ax.plot(xs, [p[key]["p50"] for p in pts], "o-", label=f"{label} p50, γ={gamma}")
            ax.plot(xs, [p[key]["p95"] for p in pts], "^:", label=f"{label} p95, γ={gamma}")
    ax.set(xlabel="concurrent sessions", ylabel="latency (ms)", title="Latency against sessions")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _draw_acceptance(ax: Any, points: list[dict[str, Any]]) -> None:
    pts = _by(points, "gamma")
    gammas = [p["gamma"] for p in pts]
    ax.plot(gammas, [p["acceptance_rate"] for p in pts], "o-", label="acceptance rate (accepted/drafted)")
    ax.set(xlabel="gamma (draft tokens per round)", ylabel="acceptance rate", ylim=(0, 1.05),
           title="Acceptance against gamma")
    twin = ax.twinx()
    twin.plot(gammas, [p["mean_accepted_length"] for p in pts], "s--", color="tab:orange",
              label="tokens per round")
    twin.set_ylabel("tokens per round")
    ax.legend(loc="lower left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)


def _draw_batches(ax: Any, points: list[dict[str, Any]]) -> None:
    for p in points:
        if p["verifier"] and p["verifier"]["batch_size_histogram"]:
            hist = p["verifier"]["batch_size_histogram"]
            sizes = sorted(int(k) for k in hist)
            ax.plot(sizes, [hist[s] if s in hist else hist[str(s)] for s in sizes], "o-",
                    label=f"{p['sessions']} sessions, γ={p['gamma']}")
    ax.set(xlabel="sessions per forward pass", ylabel="forward passes",
           title="Verifier batch-size distribution")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
