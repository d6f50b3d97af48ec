"""Command-line options of the pair tools, apart from the tools (they import torch; --help must not).

``specd train-pair`` / ``specd pair-report`` and ``python -m specd.pair.train`` / ``.report`` share them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parents[2] / "common" / "assets" / "tiny_pair"
"""common.models.BUNDLED_DIR, without importing torch."""

TRAIN_DESCRIPTION = "Train the bundled tiny draft/target pair on the Python standard library."
REPORT_DESCRIPTION = ("Measure how well the bundled tiny draft matches its target, and what a draft "
                      "step costs.")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="specd-pair", help="output folder (relative to the working "
                        "directory; the bundled pair is common/assets/tiny_pair in a checkout)")
    # Step budgets sized for ~50 minutes on a quiet 2-core CPU (target 2.6 s/step, draft 0.17,
    # distillation 0.8 s/step with 2 threads). The draft's plain phase is kept short: trained
    # longer on the data it overtakes the (equally data-starved) target's validation loss, and
    # distillation, not data, is what makes it agree with the target.
    parser.add_argument("--target-steps", type=int, default=700)
    parser.add_argument("--draft-steps", type=int, default=500, help="plain draft training")
    parser.add_argument("--distill-steps", type=int, default=1000, help="draft distillation")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--vocab-size", type=int, default=4096, help="incl. special tokens")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-positions", type=int, default=1024)
    parser.add_argument("--target-lr", type=float, default=3e-3)
    parser.add_argument("--draft-lr", type=float, default=3e-3)
    parser.add_argument("--distill-lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=float, default=0.02, help="fraction of each budget")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-tokens", type=int, default=65536, help="validation tokens")
    parser.add_argument(
        "--reuse-target",
        action="store_true",
        help="keep the target and tokenizer already in --out; retrain only the draft",
    )
    parser.add_argument("--cache-dir", default="/tmp/specd_pair_cache", help="token cache")


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pair", default=str(BUNDLED_DIR), help="pair folder (default: the bundled pair)")
    shared = Path(__file__).resolve().parents[2].parent / "shared"  # ../shared beside the checkout
    parser.add_argument("--humaneval", default=str(shared / "data" / "humaneval.json"))
    parser.add_argument("--json", default="benchmarks/results/pair_report.json")
    parser.add_argument("--md", default="benchmarks/results/pair_report.md")
    parser.add_argument("--heldout-tokens", type=int, default=24576)
    parser.add_argument("--window", type=int, default=256, help="held-out window length")
    parser.add_argument("--humaneval-prompts", type=int, default=164)
    parser.add_argument("--rounds", type=int, default=2000, help="timed steps per model")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for accuracy")
    parser.add_argument("--sample-tokens", type=int, default=48)
