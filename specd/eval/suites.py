"""Reading evaluation suites into ``Question``s: Spec-Bench, WMT, CNN/DailyMail, HumanEval, JSONL.

A question the reader cannot use (a malformed JSONL line, a record without its text) becomes a
``Question`` with ``error`` set: the runner writes an error record for it and goes on.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specd.prompts import PromptError, read_text

SUITES = ("specbench", "wmt", "cnndm", "humaneval", "jsonl")

CNNDM_INSTRUCTION = "Summarize the following article in a few sentences.\n\n{article}\n\nSummary:"


class SuiteError(Exception):
    """The data file cannot be read as the suite at all (missing, not JSON, wrong shape)."""


@dataclass(frozen=True)
class Question:
    question_id: str
    category: str
    turns: tuple[str, ...] = ()
    reference: str | None = None  # WMT translation, CNN/DM highlights
    test: str | None = None  # HumanEval: the check() code
    entry_point: str | None = None
    error: str | None = None  # set when the input record is unusable
    extra: dict[str, Any] = field(default_factory=dict)


def read_suite(suite: str, path: Path, text_field: str = "text") -> list[Question]:
    """All questions of ``path`` read as ``suite``; raises SuiteError for an unreadable file."""
    try:
        text = read_text(path, "data file")  # the messages of every prompts file (not UTF-8 too)
    except PromptError as exc:
        raise SuiteError(str(exc)) from None
    readers = {"specbench": _specbench, "wmt": _wmt, "cnndm": _cnndm, "humaneval": _humaneval,
               "jsonl": lambda items: _plain(items, text_field)}
    if suite not in readers:
        raise SuiteError(f"unknown suite {suite!r}: choose one of {', '.join(SUITES)}")
    questions = list(readers[suite](_items(text)))
    if not questions:
        raise SuiteError(f"{path} holds no questions")
    _check_unique(questions, path)
    return questions


def _items(text: str) -> Iterator[tuple[int, Any]]:
    """(1-based position, record) from a JSON list, a JSON object of columns, or JSONL lines.

    A JSONL line that is not JSON yields ``(line, SyntaxError)`` so that it gets an error record.
    """
    stripped = text.lstrip()
    if stripped[:1] in ("[", "{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSONL whose first line is an object
        if isinstance(whole, list):
            yield from enumerate(whole, 1)
            return
        if isinstance(whole, dict) and whole and all(isinstance(v, list) for v in whole.values()):
            yield from enumerate(_rows_of_columns(whole), 1)
            return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, SyntaxError(f"line {number} is not JSON: {exc.msg} at column {exc.colno}")


def _rows_of_columns(columns: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """{"prompt": [...], "label": [...]} -> [{"prompt": p, "label": l}, ...]."""
    length = min(len(v) for v in columns.values())
    return [{key: values[i] for key, values in columns.items()} for i in range(length)]


def _bad(number: int, record: Any, why: str) -> Question:
    qid = record.get("question_id") if isinstance(record, dict) else None
    qid = str(qid) if qid is not None else f"line-{number}"
    message = str(record) if isinstance(record, SyntaxError) else f"record {number}: {why}"
    return Question(qid, "invalid", error=message)


def _first_text(value: Any) -> str | None:
    """A string, or the first string of a list (WMT stores one-element lists)."""
    if isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, str) and value.strip() else None


def _qid(record: dict[str, Any], number: int, *keys: str) -> str:
    for key in (*keys, "question_id", "id", "task_id"):
        if record.get(key) is not None:
            return str(record[key])
    return str(number)


def _specbench(items: Iterable[tuple[int, Any]]) -> Iterator[Question]:
    for number, record in items:
        turns = record.get("turns") if isinstance(record, dict) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
            yield _bad(number, record, "needs `turns`, a list of strings")
            continue
        yield Question(_qid(record, number), str(record.get("category") or "all"), tuple(turns))


def _wmt(items: Iterable[tuple[int, Any]]) -> Iterator[Question]:
    for number, record in items:
        prompt = _first_text(record.get("prompt")) if isinstance(record, dict) else None
        label = _first_text(record.get("label")) if isinstance(record, dict) else None
        if prompt is None or label is None:
            yield _bad(number, record, "needs `prompt` and `label` (strings or one-string lists)")
            continue
        yield Question(_qid(record, number), "translation", (prompt,), reference=label)


def _cnndm(items: Iterable[tuple[int, Any]]) -> Iterator[Question]:
    for number, record in items:
        article = _first_text(record.get("article")) if isinstance(record, dict) else None
        highlights = _first_text(record.get("highlights")) if isinstance(record, dict) else None
        if article is None or highlights is None:
            yield _bad(number, record, "needs `article` and `highlights` strings")
            continue
        yield Question(_qid(record, number), "summarization",
                       (CNNDM_INSTRUCTION.format(article=article.strip()),), reference=highlights)


def _humaneval(items: Iterable[tuple[int, Any]]) -> Iterator[Question]:
    for number, record in items:
        ok = isinstance(record, dict) and all(
            isinstance(record.get(k), str) and record.get(k) for k in ("prompt", "test", "entry_point"))
        if not ok:
            yield _bad(number, record, "needs `prompt`, `test` and `entry_point` strings")
            continue
        yield Question(_qid(record, number, "task_id"), "coding", (record["prompt"],),
                       test=record["test"], entry_point=record["entry_point"],
                       extra={"canonical_solution": record.get("canonical_solution") or ""})


def _plain(items: Iterable[tuple[int, Any]], text_field: str) -> Iterator[Question]:
    for number, record in items:
        text = record if isinstance(record, str) else (
            _first_text(record.get(text_field)) if isinstance(record, dict) else None)
        if not text:
            yield _bad(number, record, f"needs a `{text_field}` string (set --field)")
            continue
        category = str(record.get("category") or "all") if isinstance(record, dict) else "all"
        qid = _qid(record, number) if isinstance(record, dict) else str(number)
        yield Question(qid, category, (text,))


def _check_unique(questions: list[Question], path: Path) -> None:
    seen: set[str] = set()
    for q in questions:
        if q.question_id in seen:
            raise SuiteError(f"{path}: question id {q.question_id!r} appears twice; ids must be unique")
        seen.add(q.question_id)


def select(questions: list[Question], categories: list[str] | None = None, sample: int = 0,
           seed: int = 0, max_examples: int = 0) -> list[Question]:
    """Filter by category, then a seeded sample (file order kept), then the first ``max_examples``."""
    chosen = [q for q in questions if not categories or q.category in categories or q.error]
    if sample and sample < len(chosen):
        keep = set(random.Random(seed).sample(range(len(chosen)), sample))
        chosen = [q for i, q in enumerate(chosen) if i in keep]
    return chosen[:max_examples] if max_examples else chosen
