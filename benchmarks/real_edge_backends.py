"""The real pair's draft on each edge backend and precision: acceptance, drafting cost, exactness.

    PYTHONPATH=. python benchmarks/real_edge_backends.py --out benchmarks/results/real_edge_backends

Each configuration runs ``specd generate --chat --json`` once per prompt, each in a fresh process
(embedded Redis, the verifier in the same process, one torch thread), after a target-only run of
the same prompt; every speculative text is compared with target-only's. Figures per
configuration are sums over the prompts: drafted and accepted tokens, rounds, and the edge's
drafting time (its prompt prefill included) per drafted token, and tokens per second of session
wall time (model loading excluded). ``--reps N`` repeats the whole set, each repetition starting
one configuration later (this machine is shared: compare within a run, and across repetitions).
Converted models are cached in ``--cache-dir``: run once to fill it, or the first repetition's
first prompt of each backend pays its conversion (``first prompt wall s``: process start and
loading, and the conversion when it was not cached; never in the other figures).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that checks whether a number is prime.",
    "What is the capital of France, and what is it famous for?",
    "Translate to English: Der Hund läuft schnell über die Straße.",
]

FLOAT_DRAFT = ["--draft-model", "smollm2-135m-instruct"]
# (label, extra `specd generate` flags): the shipped 4-bit draft on torch, then the float
# model converted by each backend at the precisions it offers.
CONFIGS: list[tuple[str, list[str]]] = [
    ("torch int4 (smollm2-135m-int4, the default)", ["--draft-model", "smollm2-135m-int4"]),
    ("genai int4", [*FLOAT_DRAFT, "--backend", "genai", "--precision", "int4"]),
    ("genai f32", [*FLOAT_DRAFT, "--backend", "genai", "--precision", "f32"]),
    ("openvino f32", [*FLOAT_DRAFT, "--backend", "openvino", "--precision", "f32"]),
    ("openvino int8", [*FLOAT_DRAFT, "--backend", "openvino", "--precision", "int8"]),
]


def generate(prompt: str, flags: list[str], common: list[str]) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "specd", "generate", "--chat", "--json", "--prompt", prompt,
                           *common, *flags], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]}, wall
    try:
        return json.loads(done.stdout), wall
    except json.JSONDecodeError:  # something else wrote to stdout: a bug worth seeing
        return {"error": ["stdout is not one JSON document: " + done.stdout[:200]]}, wall


def run_config(label: str, flags: list[str], common: list[str], expected: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"config": label, "flags": flags, "drafted": 0, "accepted": 0, "rounds": 0,
                           "tokens": 0, "draft_ms": 0.0, "wall_ms": 0.0, "equal": 0, "prompts": 0}
    for index, prompt in enumerate(PROMPTS):
        result, wall = generate(prompt, flags, common)
        if "error" in result:
            row["error"] = result["error"]
            return row
        if index == 0:
            row["first_wall_s"] = round(wall, 1)
        row["prompts"] += 1
        row["equal"] += int(result["text"] == expected[index])
        for key in ("drafted", "accepted", "rounds", "tokens", "draft_ms", "wall_ms"):
            row[key] += result[key]
    row["acceptance"] = round(row["accepted"] / row["drafted"], 3) if row["drafted"] else 0.0
    row["tokens_per_round"] = round(row["tokens"] / row["rounds"], 2) if row["rounds"] else 0.0
    row["draft_ms_per_token"] = round(row["draft_ms"] / row["drafted"], 2) if row["drafted"] else 0.0
    row["tokens_per_s"] = round(1000 * row["tokens"] / row["wall_ms"], 2) if row["wall_ms"] else 0.0
    return row


def _joined(rows: list[dict[str, Any]], key: str) -> str:
    return " / ".join(str(row[key]) for row in rows)


def write_markdown(path: Path, results: dict[str, list[dict[str, Any]]], target_tokens_per_s: float,
                   args: argparse.Namespace) -> None:
    lines = [
        "# The real pair's draft on each edge backend",
        "",
        f"Run: `PYTHONPATH=. python benchmarks/real_edge_backends.py --gamma {args.gamma} "
        f"--max-new-tokens {args.max_new_tokens} --reps {args.reps} --out {args.out}`",
        "",
        f"Target smollm2-135m-instruct (float32, torch); {len(PROMPTS)} chat prompts, "
        f"{args.max_new_tokens} new tokens each, gamma {args.gamma}, greedy; figures summed over the "
        "prompts; the timed figures once per repetition (rep 1 / rep 2 / ...). The target alone "
        f"(`--mode target`, before the repetitions): {target_tokens_per_s} tok/s of session wall time.",
        "",
        "| draft | equal to target-only | drafted | accepted | acceptance | tokens/round "
        "| draft ms per drafted token | session tok/s | first prompt wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, rows in results.items():
        failed = [row for row in rows if "error" in row]
        if failed:
            lines.append(f"| {label} | error: {' '.join(failed[0]['error'])} | | | | | | | |")
            continue
        first = rows[0]
        equal = sum(row["equal"] for row in rows)
        lines.append(f"| {label} | {equal}/{first['prompts'] * len(rows)} | {first['drafted']} "
                     f"| {first['accepted']} | {first['acceptance']} | {first['tokens_per_round']} "
                     f"| {_joined(rows, 'draft_ms_per_token')} | {_joined(rows, 'tokens_per_s')} "
                     f"| {_joined(rows, 'first_wall_s')} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gamma", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--cache-dir", default="", help="converted models (empty: ~/.cache/specd)")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/real_edge_backends")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    common = ["--target-model", "smollm2-135m-instruct", "--torch-threads", "1", "--gamma", str(args.gamma),
              "--max-new-tokens", str(args.max_new_tokens)]
    if args.cache_dir:
        common += ["--draft-cache-dir", args.cache_dir]
    expected, tokens, wall_ms = [], 0, 0.0
    for prompt in PROMPTS:
        result, _ = generate(prompt, ["--mode", "target"], common)
        if "error" in result:  # no baseline: nothing else can be compared
            raise SystemExit(f"target-only run failed: {' '.join(result['error'])}")
        expected.append(result["text"])
        tokens, wall_ms = tokens + result["tokens"], wall_ms + result["wall_ms"]
    target_tokens_per_s = round(1000 * tokens / wall_ms, 2)
    results: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in CONFIGS}
    for rep in range(args.reps):
        shift = rep % len(CONFIGS)
        for label, flags in CONFIGS[shift:] + CONFIGS[:shift]:
            results[label].append(run_config(label, flags, common, expected))
            print(json.dumps({"rep": rep + 1, **results[label][-1]}), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(out.with_suffix(".md"), results, target_tokens_per_s, args)


if __name__ == "__main__":
    main()
