"""The throughput table of two trees side by side: `benchmarks/throughput.py` of each, alternated.

Each run is one tree's own `benchmarks/throughput.py` (its harness matches its code) in a fresh
process with `PYTHONPATH` at that tree, one after the other (never in parallel), in the order
old, new, new, old, old, new... so drift on a shared machine hits both alike. Reported per
configuration: every run's tokens/s, the medians and their ratio; the HF-assisted row runs none
of specd's code, so its ratio is the noise floor of the window.

    git archive <old-commit> | tar -x -C /tmp/old_tree
    PYTHONPATH=. python benchmarks/throughput_compare.py --old /tmp/old_tree --old-label <old-commit> \\
        --runs 2 --out benchmarks/results/throughput_compare.json -- --prompts 6 --max-new-tokens 48
    PYTHONPATH=. python benchmarks/throughput_compare.py --old /tmp/old_tree \
        --merge a.json b.json --out benchmarks/results/throughput_compare_pooled.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]


def run_tree(tree: Path, extra: list[str], out: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "benchmarks/throughput.py", *extra, "--out", str(out)], cwd=tree,
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def summary(runs: dict[str, list[dict[str, Any]]], labels: tuple[str, str]) -> list[dict[str, Any]]:
    rows = []
    for index, first in enumerate(runs[labels[0]][0]["rows"]):
        rates = {label: [r["rows"][index]["tokens_per_s"] for r in runs[label]] for label in labels}
        old, new = (statistics.median(rates[label]) for label in labels)
        rows.append({"name": first["name"], "sessions": first["sessions"],
                     **{f"{label} tokens/s": rates[label] for label in labels},
                     "old median": round(old, 2), "new median": round(new, 2),
                     "new / old": round(new / old, 3) if old else None})
    return rows


def markdown(report: dict[str, Any]) -> str:
    old, new = report["labels"]
    lines = [f"# Throughput, {old} vs {new} (bundled pair, alternated runs)", "",
             f"Command: `{' '.join(report['command'])}`", "",
             f"| configuration | sessions | {old} tok/s (runs) | {new} tok/s (runs) | median new / old |",
             "|---|---:|---:|---:|---:|"]
    for row in report["rows"]:
        runs = [", ".join(str(round(v, 1)) for v in row[f"{label} tokens/s"]) for label in (old, new)]
        lines.append(f"| {row['name']} | {row['sessions']} | {runs[0]} | {runs[1]} | {row['new / old']} |")
    return "\n".join(lines) + "\n"


def merge(paths: list[Path], out: Path, argv: list[str] | None) -> int:
    reports = [json.loads(p.read_text()) for p in paths]
    labels = reports[0]["labels"]
    runs = {label: [{"rows": [{"name": row["name"], "sessions": row["sessions"],
                               "tokens_per_s": row[f"{label} tokens/s"][i]} for row in report["rows"]]}
                    for report in reports for i in range(len(report["rows"][0][f"{label} tokens/s"]))]
            for label in labels}
    report = {"command": ["python", "benchmarks/throughput_compare.py", *(argv or sys.argv[1:])],
              "merged": [str(p) for p in paths], "labels": labels,
              "rows": summary(runs, (labels[0], labels[1]))}
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="the older checkout")
    parser.add_argument("--old-label", default="before")
    parser.add_argument("--new-label", default="this tree")
    parser.add_argument("--runs", type=int, default=2, help="runs of each tree, alternated")
    parser.add_argument("--out", type=Path, default=HERE / "benchmarks/results/throughput_compare.json")
    parser.add_argument("--merge", type=Path, nargs="+",
                        help="pool the runs of earlier reports (same labels) instead of running")
    parser.add_argument("extra", nargs="*", help="arguments for throughput.py (after --)")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, argv)
    labels = (args.old_label, args.new_label)
    trees = {args.old_label: args.old.resolve(), args.new_label: HERE}
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    with tempfile.TemporaryDirectory() as scratch:
        for attempt in range(args.runs):
            for label in labels if attempt % 2 == 0 else labels[::-1]:  # ABBA: order cancels drift
                out = Path(scratch) / f"{label.replace('/', '_')}-{attempt}.json"
                runs[label].append(run_tree(trees[label], args.extra, out))
                print(f"{label} run {attempt + 1}: done", flush=True)
    report = {"command": ["python", "benchmarks/throughput_compare.py", *(argv or sys.argv[1:])],
              "labels": list(labels), "rows": summary(runs, labels),
              "ratios": {label: [r["ratios"] for r in runs[label]] for label in labels}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
