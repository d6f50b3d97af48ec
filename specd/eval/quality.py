"""Quality per mode from kept libraries: BLEU (sacrebleu), ROUGE (rouge-score), pass@1.

pass@1 is not computed here from text: the runner executes each completion when its question
finishes and stores ``passed`` in the block (see harness), so the summary is a function of the
records alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class QualityUnavailableError(RuntimeError):
    """A metric's library is not installed."""


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise QualityUnavailableError(
            f"{module} is not installed: pip install 'specd[eval]' (sacrebleu, rouge-score)") from exc


def translation_hypothesis(text: str) -> str:
    """The first non-empty line: a small model keeps writing past the translation."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu's defaults: 13a tokenization, exponential smoothing off)."""
    sacrebleu = _need("sacrebleu")
    if not hypotheses:
        return 0.0
    hyps = [translation_hypothesis(h) for h in hypotheses]
    return round(float(sacrebleu.corpus_bleu(hyps, [list(references)]).score), 4)


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean F1 of ROUGE-1, ROUGE-2 and ROUGE-L (stemmed), in percent."""
    scorer_module = _need("rouge_score.rouge_scorer")
    names = ("rouge1", "rouge2", "rougeL")
    if not hypotheses:
        return dict.fromkeys(names, 0.0)
    scorer = scorer_module.RougeScorer(list(names), use_stemmer=True)
    totals = dict.fromkeys(names, 0.0)
    for hyp, ref in zip(hypotheses, references, strict=True):
        scores = scorer.score(ref, hyp)
        for name in names:
            totals[name] += scores[name].fmeasure
    return {name: round(100 * total / len(hypotheses), 4) for name, total in totals.items()}


def pass_at_1(passed: Sequence[bool]) -> float:
    return round(sum(bool(p) for p in passed) / len(passed), 4) if passed else 0.0
