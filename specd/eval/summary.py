"""The summary of an eval: a pure function of the records (plus the run's own timings).

Per category and overall, per mode (speculative per gamma): means of every per-question figure,
speedup over target-only (aggregate tokens/s ratio), target forward passes per token (what the
cloud pays per token), exact match with target-only, quality, and the labels users of earlier tools
know.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TextIO

from specd.eval import quality

COMMON = ("new_tokens", "time_s", "tokens_per_s", "target_forward_passes")
SPECULATIVE = ("acceptance_rate", "mean_accepted_length", "rounds", "drafted", "accepted", "draft_ms",
               "queue_ms", "verify_ms", "transport_ms", "first_token_ms")


def acceptance_label(rate: float) -> str:
    return "excellent" if rate >= 0.5 else "good" if rate >= 0.3 else "moderate" if rate >= 0.1 else "poor"


def speedup_label(speedup: float) -> str:
    return "beneficial" if speedup > 1.0 else "marginal" if speedup > 0.8 else "slower"


def spec_blocks(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The speculative blocks of a record by gamma (as a string key)."""
    return {str(b["gamma"]): b for b in record.get("speculative") or []}


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


def _throughput(blocks: list[dict[str, Any]]) -> float:
    seconds = sum(b["time_s"] for b in blocks)
    return sum(b["new_tokens"] for b in blocks) / seconds if seconds else 0.0


def _mode_figures(blocks: list[dict[str, Any]], fields: Iterable[str]) -> dict[str, Any]:
    figures: dict[str, Any] = {"n": len(blocks)}
    for name in fields:  # each figure's mean over the questions
        figures[name] = _mean([float(b.get(name, 0.0)) for b in blocks])
    tokens = sum(b["new_tokens"] for b in blocks)
    figures["tokens_per_s_aggregate"] = round(_throughput(blocks), 3)
    figures["target_passes_per_token"] = round(
        sum(b["target_forward_passes"] for b in blocks) / tokens, 4) if tokens else 0.0
    return figures


def _spec_figures(pairs: list[tuple[dict[str, Any], dict[str, Any] | None]]) -> dict[str, Any]:
    """Figures of speculative blocks, each paired with its record's target-only block (or None)."""
    blocks = [spec for spec, _ in pairs]
    figures = _mode_figures(blocks, (*COMMON, *SPECULATIVE))
    figures["acceptance"] = acceptance_label(figures["acceptance_rate"])
    compared = [spec["matches_target"] for spec, target in pairs if target is not None]
    if compared:
        figures["exact_match"] = {"equal": sum(bool(m) for m in compared), "compared": len(compared),
                                  "rate": _mean([float(bool(m)) for m in compared])}
    targets = [target for _, target in pairs if target is not None]
    if len(targets) == len(pairs) and targets:
        base = _throughput(targets)
        speedup = _throughput(blocks) / base if base else 0.0
        figures["speedup"] = round(speedup, 4)
        figures["speedup_label"] = speedup_label(speedup)
    return figures


def group_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-mode figures of a group of successful records."""
    out: dict[str, Any] = {}
    for mode in ("target", "draft"):
        blocks = [r[mode] for r in records if mode in r]
        if blocks:
            out[mode] = _mode_figures(blocks, COMMON)
    gammas = sorted({g for r in records for g in spec_blocks(r)}, key=int)
    if gammas:
        out["speculative"] = {g: _spec_figures([(spec_blocks(r)[g], r.get("target")) for r in records
                                                if g in spec_blocks(r)]) for g in gammas}
    return out


def _mode_texts(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    texts: dict[str, list[str]] = {}
    for r in records:
        for mode in ("target", "draft"):
            if mode in r:
                texts.setdefault(mode, []).append(r[mode]["text"])
        for g, block in spec_blocks(r).items():
            texts.setdefault(f"speculative@{g}", []).append(block["text"])
    return texts


def suite_quality(records: list[dict[str, Any]], suite: str) -> dict[str, Any]:
    """BLEU (wmt), ROUGE (cnndm), pass@1 (humaneval) per mode; {} for suites without references."""
    if suite in ("wmt", "cnndm"):
        refs = [r["reference"] for r in records]
        metric = quality.bleu if suite == "wmt" else quality.rouge
        key = "bleu" if suite == "wmt" else "rouge"
        return {mode: {key: metric(texts, refs)} for mode, texts in _mode_texts(records).items()}
    if suite == "humaneval":
        passed: dict[str, list[bool]] = {}
        for r in records:
            for mode in ("target", "draft"):
                if mode in r:
                    passed.setdefault(mode, []).append(bool(r[mode].get("passed")))
            for g, block in spec_blocks(r).items():
                passed.setdefault(f"speculative@{g}", []).append(bool(block.get("passed")))
        return {mode: {"pass@1": quality.pass_at_1(p), "passed": sum(p), "n": len(p)}
                for mode, p in passed.items()}
    return {}


def speedup_basis(run: dict[str, Any]) -> str:
    """What ``speedup`` (and its label) measures: per-question latency, at the run's concurrency.

    At concurrency N a speculative session shares the verifier and the draft model with N-1
    others while each target-only question ran alone: its latency can be worse while the suite's
    throughput (``run.throughput_speedup``) is better. Both are right; neither is "the" speedup.
    """
    concurrency = run.get("concurrency") or 1
    alone = "one session at a time" if concurrency == 1 else f"{concurrency} sessions at once"
    return (f"per-question latency: speculative ({alone}) over target-only (one question at a time); "
            "suite throughput (all questions over each mode's wall time) is run.throughput_speedup")


def summarize(records: list[dict[str, Any]], suite: str, selected: int | None = None,
              run: dict[str, Any] | None = None) -> dict[str, Any]:
    ok = [r for r in records if "error" not in r]
    categories = sorted({str(r.get("category")) for r in ok})
    return {
        "suite": suite, "speedup_basis": speedup_basis(run or {}),
        "counts": {"total": len(records) if selected is None else selected, "processed": len(records),
                   "succeeded": len(ok), "failed": len(records) - len(ok)},
        "categories": {c: group_figures([r for r in ok if str(r.get("category")) == c])
                       for c in categories},
        "overall": group_figures(ok),
        "quality": suite_quality(ok, suite),
        "errors": [{"question_id": r["question_id"], "error": r["error"]} for r in records
                   if "error" in r][:50],
        "run": run or {},
    }


def _row(name: str, figures: dict[str, Any]) -> list[list[str]]:
    target = figures.get("target", {})
    draft = figures.get("draft", {})
    rows = []
    for g, spec in (figures.get("speculative") or {"-": {}}).items():
        match = spec.get("exact_match")
        rows.append([
            name, str(spec.get("n", target.get("n", 0))), g,
            f"{target.get('tokens_per_s_aggregate', 0):.1f}", f"{draft.get('tokens_per_s_aggregate', 0):.1f}",
            f"{spec.get('tokens_per_s_aggregate', 0):.1f}", f"{spec.get('acceptance_rate', 0):.3f}",
            f"{spec.get('mean_accepted_length', 0):.2f}", f"{spec.get('speedup', 0):.2f}",
            f"{spec.get('target_passes_per_token', 0):.3f}",
            f"{match['equal']}/{match['compared']}" if match else "-",
            f"{spec.get('acceptance', '-')}/latency {spec.get('speedup_label', '-')}",
        ])
    return rows


HEADER = ["category", "n", "gamma", "target tok/s", "draft tok/s", "spec tok/s", "accept", "acc len",
          "latency x", "passes/tok", "exact", "labels"]


def headline(summary: dict[str, Any]) -> list[str]:
    """Both speedups side by side, each named: suite throughput first (what a pool serves), then
    the per-question latency at the run's concurrency (what one user waits)."""
    run = summary.get("run") or {}
    concurrency = run.get("concurrency") or 1
    lines = []
    for name, speedup in (run.get("throughput_speedup") or {}).items():
        lines.append(f"suite throughput {name} / target-only: {speedup:.2f}x "
                     f"(all questions, {concurrency} at once)")
    for gamma, spec in (summary["overall"].get("speculative") or {}).items():
        if "speedup" in spec:
            lines.append(f"per-question latency speculative@{gamma} / target-only: {spec['speedup']:.2f}x "
                         f"(a session among {concurrency} at once, against target-only alone)")
    return lines


def print_table(summary: dict[str, Any], out: TextIO) -> None:
    rows = [HEADER]
    for name, figures in summary["categories"].items():
        rows += _row(name, figures)
    rows += _row("OVERALL", summary["overall"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n")
    counts = summary["counts"]
    out.write(f"questions: {counts['total']} total, {counts['processed']} processed, "
              f"{counts['succeeded']} succeeded, {counts['failed']} failed\n")
    for mode, figures in summary["quality"].items():
        out.write(f"quality {mode}: " + ", ".join(f"{k}={v}" for k, v in figures.items()) + "\n")
    run = summary.get("run") or {}
    if run:
        out.write(f"run: {run.get('wall_s', 0):.1f}s wall, concurrency {run.get('concurrency')}, "
                  + ", ".join(f"{m} {p['wall_s']:.1f}s ({p['tokens_per_s']:.1f} tok/s)"
                              for m, p in run.get("phases", {}).items()) + "\n")
    for line in headline(summary):
        out.write(line + "\n")
