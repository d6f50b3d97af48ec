"""The eval summary is a function of the records: recomputed here by hand from the same records."""

from __future__ import annotations

import random
from typing import Any

import pytest

from specd.eval.quality import bleu, pass_at_1, rouge
from specd.eval.summary import acceptance_label, speedup_label, summarize


def _block(rng: random.Random, tokens: list[int]) -> dict[str, Any]:
    time_s = rng.uniform(0.05, 0.5)
    return {"text": " ".join(map(str, tokens)), "token_ids": tokens, "new_tokens": len(tokens),
            "time_s": time_s, "tokens_per_s": len(tokens) / time_s,
            "target_forward_passes": len(tokens), "seed": 0}


def _records(n: int = 30) -> list[dict[str, Any]]:
    rng = random.Random(5)
    records: list[dict[str, Any]] = []
    for i in range(n):
        tokens = [rng.randrange(50) for _ in range(rng.randrange(1, 20))]
        target = _block(rng, tokens)
        specs = []
        for gamma in (2, 4):
            spec = _block(rng, tokens if i % 7 else [*tokens[:-1], 99])
            rounds = max(1, len(tokens) // gamma)
            drafted = rounds * gamma
            accepted = rng.randrange(drafted + 1)
            spec.update(gamma=gamma, rounds=rounds, drafted=drafted, accepted=accepted,
                        target_forward_passes=rounds, acceptance_rate=accepted / drafted,
                        mean_accepted_length=len(tokens) / rounds, draft_ms=1.0, queue_ms=2.0,
                        verify_ms=3.0, transport_ms=0.5, first_token_ms=4.0,
                        matches_target=spec["token_ids"] == target["token_ids"])
            specs.append(spec)
        records.append({"question_id": str(i), "category": "abc"[i % 3], "target": target,
                        "draft": _block(rng, tokens[::-1]), "speculative": specs})
    records.append({"question_id": "bad", "category": "invalid", "error": "line 9 is not JSON"})
    return records


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values)


def _tps(blocks: list[dict[str, Any]]) -> float:
    return sum(b["new_tokens"] for b in blocks) / sum(b["time_s"] for b in blocks)


def test_summary_figures_match_a_recomputation_from_the_records() -> None:
    records = _records()
    summary = summarize(records, "specbench", selected=40)
    assert summary["counts"] == {"total": 40, "processed": 31, "succeeded": 30, "failed": 1}
    assert summary["errors"] == [{"question_id": "bad", "error": "line 9 is not JSON"}]
    ok = [r for r in records if "error" not in r]
    for category in "abc":
        group = [r for r in ok if r["category"] == category]
        for gamma in ("2", "4"):
            specs = [next(s for s in r["speculative"] if str(s["gamma"]) == gamma) for r in group]
            got = summary["categories"][category]["speculative"][gamma]
            assert got["n"] == len(group)
            rate = _mean(s["acceptance_rate"] for s in specs)
            assert got["acceptance_rate"] == pytest.approx(rate, abs=1e-4)
            assert got["tokens_per_s"] == pytest.approx(_mean(s["tokens_per_s"] for s in specs), abs=1e-4)
            assert got["speedup"] == pytest.approx(_tps(specs) / _tps([r["target"] for r in group]), abs=1e-4)
            passes = sum(s["target_forward_passes"] for s in specs)
            assert got["target_passes_per_token"] == pytest.approx(
                passes / sum(s["new_tokens"] for s in specs), abs=1e-4)
            assert got["exact_match"]["equal"] == sum(s["matches_target"] for s in specs)
            assert got["acceptance"] == acceptance_label(got["acceptance_rate"])
            assert got["speedup_label"] == speedup_label(got["speedup"])
        assert summary["categories"][category]["target"]["time_s"] == pytest.approx(
            sum(r["target"]["time_s"] for r in group) / len(group), abs=1e-4)
    overall = summary["overall"]["speculative"]["4"]
    assert overall["n"] == 30 and overall["exact_match"]["compared"] == 30
    assert overall["exact_match"]["equal"] == sum(1 for i in range(30) if i % 7)


@pytest.mark.parametrize(("rate", "label"),
                         [(0.5, "excellent"), (0.3, "good"), (0.1, "moderate"), (0.09, "poor")])
def test_acceptance_labels(rate: float, label: str) -> None:
    assert acceptance_label(rate) == label


@pytest.mark.parametrize(("speedup", "label"), [(1.01, "beneficial"), (1.0, "marginal"), (0.81, "marginal"),
                                                (0.8, "slower")])
def test_speedup_labels(speedup: float, label: str) -> None:
    assert speedup_label(speedup) == label


def test_quality_metrics_from_kept_libraries() -> None:
    refs = ["the cat sat on the mat today", "a quick brown fox jumps"]
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert bleu(["nothing alike here at all", "zzz"], refs) < 5
    continued = ["the cat sat on the mat today\nand more text", "a quick brown fox jumps"]
    assert bleu(continued, refs) == pytest.approx(100.0)  # the first line is the translation
    scores = rouge(refs, refs)
    assert scores == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}
    assert rouge(["the cat", "fox"], refs)["rouge1"] < 60
    assert pass_at_1([True, False, True, True]) == 0.75


def test_suite_quality_per_mode() -> None:
    records = [{"question_id": "1", "category": "translation", "reference": "hello there my dear old world",
                "target": {"text": "hello there my dear old world"}, "draft": {"text": "bye"},
                "speculative": [{"gamma": 4, "text": "hello there my dear old world"}]}]
    from specd.eval.summary import suite_quality

    got = suite_quality(records, "wmt")
    assert got["target"]["bleu"] == got["speculative@4"]["bleu"] == pytest.approx(100.0)
    assert got["draft"]["bleu"] < 1
    code = [{"question_id": "1", "target": {"passed": True}, "draft": {"passed": False},
             "speculative": [{"gamma": 4, "passed": True}]}]
    assert suite_quality(code, "humaneval")["draft"] == {"pass@1": 0.0, "passed": 0, "n": 1}


def test_latency_and_throughput_are_named_and_do_not_contradict(tmp_path) -> None:
    """Issue 21, item 9: at concurrency 8 every category read "slower" beside a suite throughput of
    1.60x. Both figures stay; each says what it measures, the throughput first."""
    import io

    from specd.eval.plots import latency_label, write_charts
    from specd.eval.summary import print_table

    run = {"concurrency": 8, "throughput_speedup": {"speculative@2": 1.6, "speculative@4": 1.5}}
    summary = summarize(_records(), "specbench", run=run)
    basis = summary["speedup_basis"]
    assert "per-question latency" in basis and "8 sessions at once" in basis
    table = io.StringIO()
    print_table(summary, table)
    text = table.getvalue()
    for word in ("slower", "marginal", "beneficial"):  # a label is always the latency's
        assert text.count(word) == text.count(f"latency {word}"), text
    lines = text.splitlines()
    throughput = next(i for i, line in enumerate(lines) if line.startswith("suite throughput speculative@2"))
    latency = next(i for i, line in enumerate(lines) if line.startswith("per-question latency speculative@2"))
    assert throughput < latency and "1.60x" in lines[throughput] and "8 at once" in lines[latency]
    assert latency_label(summary) == "per-question latency speedup (8 at once)"
    pytest.importorskip("matplotlib")
    assert {p.name for p in write_charts(summary, tmp_path)} >= {"speedup.png", "acceptance.png"}
