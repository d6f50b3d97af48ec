"""Per-question records: their blocks (one per mode) and the JSONL file they are appended to.

A record is written as soon as its question finishes, so a run killed mid-way loses only the
questions in flight; ``--resume`` keeps the successful records (after cutting off a last line the
kill left half-written), drops the error records so that those questions run again, and skips
the rest: each question ends up with exactly one record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from specd.eval.conversation import TURN_SEPARATOR, Dialogue

MODES = ("target", "draft", "speculative")


def _round(value: float, digits: int = 4) -> float:
    return round(float(value), digits)


def mode_block(dialogue: Dialogue, texts: list[str], seed: int) -> dict[str, Any]:
    """The figures every mode reports: output, tokens, time, throughput, target passes."""
    tokens = [t for turn in dialogue.turns for t in turn.token_ids]
    time_s = sum(turn.wall_ms for turn in dialogue.turns) / 1000
    block: dict[str, Any] = {
        "text": TURN_SEPARATOR.join(texts), "token_ids": tokens, "new_tokens": len(tokens),
        "time_s": _round(time_s, 6), "tokens_per_s": _round(len(tokens) / time_s if time_s else 0.0, 3),
        "target_forward_passes": int(sum(t.stats.get("target_forward_passes", 0) for t in dialogue.turns)),
        "seed": seed,
    }
    if len(dialogue.turns) > 1:
        block["turn_texts"] = texts
        block["turn_new_tokens"] = [len(turn.token_ids) for turn in dialogue.turns]
    return block


def speculative_block(dialogue: Dialogue, texts: list[str], seed: int, gamma: int,
                      target: dict[str, Any] | None) -> dict[str, Any]:
    """``mode_block`` plus acceptance, accepted length, gamma and equality with target-only."""
    block = mode_block(dialogue, texts, seed)
    totals = {key: sum(t.stats.get(key, 0.0) for t in dialogue.turns)
              for key in ("rounds", "drafted", "accepted", "draft_ms", "queue_ms", "verify_ms",
                          "transport_ms")}
    block.update(
        gamma=gamma, rounds=int(totals["rounds"]), drafted=int(totals["drafted"]),
        accepted=int(totals["accepted"]),
        acceptance_rate=_round(totals["accepted"] / totals["drafted"] if totals["drafted"] else 0.0),
        mean_accepted_length=_round(block["new_tokens"] / totals["rounds"] if totals["rounds"] else 0.0),
        draft_ms=_round(totals["draft_ms"], 3), queue_ms=_round(totals["queue_ms"], 3),
        verify_ms=_round(totals["verify_ms"], 3), transport_ms=_round(totals["transport_ms"], 3),
        first_token_ms=_round(dialogue.turns[0].stats.get("first_token_ms", 0.0), 3),
        matches_target=None if target is None else block["token_ids"] == target["token_ids"],
    )
    return block


class RecordFile:
    """Append-only JSONL of records, one line each, flushed as written."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        """Every complete record (a half-written last line is ignored)."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "question_id" in record:
                records.append(record)
        return records

    def repair(self) -> None:
        """Cut a last line left without its newline by a killed run, so appends start clean."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)

    def done_ids(self) -> set[str]:
        return {str(r["question_id"]) for r in self.read()}

    def drop_errors(self) -> int:
        """Rewrite the file without its error records (atomically); how many were dropped."""
        records = self.read()
        kept = [r for r in records if "error" not in r]
        if len(kept) != len(records):
            self.rewrite(kept)
        return len(records) - len(kept)

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        """Replace the file's records with ``records`` (atomically)."""
        scratch = self.path.with_name(self.path.name + ".tmp")
        scratch.write_text("".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n"
                                   for r in records), encoding="utf-8")
        os.replace(scratch, self.path)

    def start(self, resume: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume:
            self.repair()
            self.drop_errors()
        else:
            self.path.write_text("")

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
