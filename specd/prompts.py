"""Reading prompt sets: JSONL with a text field, SpecBench questions, HumanEval, or plain lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _text_of(record: Any, field: str) -> str | None:
    """``field``, else the first of SpecBench's ``turns``, else HumanEval's ``prompt``."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        return None
    value = record.get(field) or (record.get("turns") or [None])[0] or record.get("prompt")
    return value if isinstance(value, str) else None


def read_prompts(path: Path, field: str = "text") -> list[str]:
    """Prompts from a JSON list (HumanEval), JSONL (``field``/``turns``/``prompt``) or text lines."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError:
            records = None
        if isinstance(records, list):
            return [p for p in (_text_of(r, field) for r in records) if p]
    prompts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            prompts.append(line)
            continue
        value = _text_of(record, field)
        if value:
            prompts.append(value)
    return prompts
