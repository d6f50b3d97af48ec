"""The bundled pair's training recipe runs end to end (a few steps) and records what it did."""

from __future__ import annotations

import json

import pytest

from common.models import load_causal_lm
from specd.pair.train import main as train_main

pytestmark = pytest.mark.integration


def test_recipe_trains_saves_and_records_a_loadable_pair(tmp_path) -> None:
    out = tmp_path / "pair"
    code = train_main(["--out", str(out), "--target-steps", "2", "--draft-steps", "2",
                       "--distill-steps", "2", "--eval-tokens", "1024", "--threads", "1",
                       "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    record = json.loads((out / "training.json").read_text())
    assert record["runs"]["target"]["steps"] == 2 and record["runs"]["draft_distill"]["steps"] == 2
    assert record["settings"]["seed"] == 1234 and len(record["corpus"]["fingerprint_sha256"]) == 64
    assert record["corpus"]["val_files"] > 0 and record["corpus"]["train_tokens"] > 1_000_000
    target, draft = load_causal_lm(str(out / "target")), load_causal_lm(str(out / "draft"))
    assert target.vocab_size == draft.vocab_size == record["vocab_size"]
    assert record["params"]["draft"] < record["params"]["target"] / 10
