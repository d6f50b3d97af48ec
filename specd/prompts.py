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


class PromptError(Exception):
    """A prompt or prompts file the command cannot use; the message names it."""


def read_text(path: Path, what: str = "prompts file") -> str:
    """The file's UTF-8 text, or a ``PromptError`` naming the file (``what``: how to call it)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise PromptError(f"{what} {path}: is a folder, not a file") from None
    except UnicodeDecodeError as exc:
        raise PromptError(f"{what} {path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                          f"offset {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise PromptError(f"{what} {path}: cannot read it: {exc.strerror}") from None


def read_prompts(path: Path, field: str = "text") -> list[str]:
    """Prompts from a JSON list (HumanEval), JSONL (``field``/``turns``/``prompt``) or text lines."""
    prompts = _parse_prompts(read_text(path), field)
    if not prompts:
        raise PromptError(f"prompts file {path}: no prompts in it (expected JSONL with a {field!r} "
                          "field, a JSON list, or one prompt per line)")
    return prompts


def _parse_prompts(text: str, field: str) -> list[str]:
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
