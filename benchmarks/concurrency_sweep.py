"""Throughput against concurrency, beside Hugging Face assisted generation, in one run.

Each repetition runs, in alternating order:

  * ``hf_assisted``: transformers' assisted generation (target + draft, ``num_assistant_tokens``
    fixed at ``--gamma``), one client, one torch thread, in a fresh child process that warms up
    on the prompts once and then times them (tokens / wall over all prompts);
  * ``specd loadtest`` over the same prompts: one pool (1 verifier), ``--edges`` edge processes,
    one point per total concurrency of ``--sweep`` (sessions split over the edges; one session
    per slot), every process one torch thread. The point with ``--edges`` x 6 = 24 sessions is
    the 4-client configuration of issue 26 (4 edges, 24 sessions, the first 6 HumanEval prompts).

With ``--profile`` a further run samples the verifier and one edge process of every point with
py-spy (``--py-spy PATH``; non-blocking, 50 Hz, active threads only) and reports where their CPU
time went: the target's forward (model layers, attention, the pass's packing), verification,
Redis and the broker, the wire format, logging, and the rest of the Python (the event loops,
scheduling, bookkeeping). The verifier's log gives each point's passes, their compute time and
their batch sizes (the loadtest report's ``verifier`` block).

    PYTHONPATH=. python benchmarks/concurrency_sweep.py --reps 2 --profile --py-spy /tmp/py-spy

Results: ``benchmarks/results/concurrency_sweep.{json,md}`` (every run; medians; ratios).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval.json"
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- HF assisted, one client


def hf_child(args: argparse.Namespace) -> None:
    """In this process: the pair loaded, one warm-up pass over the prompts, then one timed."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from side_by_side import hf_model, hf_runner, load_prompts, timed

    torch.set_num_threads(1)
    target, draft = hf_model(args.target), hf_model(args.draft)
    prompts = [target.tokenizer.encode(t) for t in load_prompts(Path(args.prompts_file), args.prompt_limit)]
    run = hf_runner(target, draft, args.gamma, args.max_new_tokens)
    timed(run, prompts)  # warm-up
    cpu = time.process_time()
    rate, outputs = timed(run, prompts)
    cpu = time.process_time() - cpu
    tokens = sum(len(o) for o in outputs)
    print(json.dumps({"tokens_per_s": round(rate, 2), "tokens": tokens, "cpu_s": round(cpu, 3),
                      "cpu_ms_per_token": round(1000 * cpu / tokens, 3)}))


def hf_assisted(args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--hf-child", "--target", args.target, "--draft", args.draft,
               "--prompts-file", args.prompts_file, "--prompt-limit", str(args.prompt_limit),
               "--max-new-tokens", str(args.max_new_tokens), "--gamma", str(args.gamma)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- specd loadtest


def loadtest(args: argparse.Namespace, log_dir: Path, profile: bool) -> dict[str, Any]:
    report = log_dir / "report.json"
    command = [sys.executable, "-m", "specd", "loadtest", "--pair", args.pair, "--edges", str(args.edges),
               "--sweep-sessions", args.sweep, "--prompts-file", args.prompts_file,
               "--prompt-limit", str(args.prompt_limit), "--max-new-tokens", str(args.max_new_tokens),
               "--gamma", str(args.gamma), "--torch-threads", "1", "--log-dir", str(log_dir),
               "--report", str(report), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    profiler = Profiler(args.py_spy, log_dir) if profile else None
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    watcher = threading.Thread(target=profiler.watch, args=(process,), daemon=True) if profiler else None
    if watcher:
        watcher.start()
    output, _ = process.communicate()
    if watcher:
        watcher.join(timeout=10)
    if process.returncode:
        raise RuntimeError(f"specd loadtest failed:\n{output[-3000:]}")
    points = json.loads(report.read_text())["points"]
    keep = ("sessions", "edges", "completed_sessions", "error_count", "tokens", "wall_s", "tokens_per_s",
            "acceptance_rate", "mean_accepted_length", "draft_ms_per_round", "round_latency_ms",
            "ttft_ms", "queue_ms", "broker_overhead_ms", "redis_rtt_ms", "verifier")
    rows = [{k: p.get(k) for k in keep} for p in points]
    if profiler:
        for row, buckets in zip(rows, profiler.points, strict=False):
            row["cpu_profile"] = buckets
    return {"points": rows}


def children() -> dict[int, str]:
    """Every process's command line (pid -> text)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Profiler:
    """Starts py-spy on the verifier and the first edge when a point's edges appear; stops it
    when they are gone; sorts the samples into buckets."""

    def __init__(self, py_spy: str, log_dir: Path) -> None:
        self.py_spy, self.log_dir = py_spy, log_dir
        self.points: list[dict[str, Any]] = []

    def watch(self, loadtest: subprocess.Popen[str]) -> None:
        index = 0
        while loadtest.poll() is None:
            procs = children()
            verifier = [p for p, c in procs.items() if "specd verifier" in c and "loadtest-v0" in c]
            edges = sorted(p for p, c in procs.items() if "specd.loadedge" in c)
            if verifier and edges:
                redis = [p for p, c in procs.items() if "redis-server" in c and p > loadtest.pid]
                busy = cpu_seconds(verifier[0])
                while any(Path(f"/proc/{p}").exists() for p in edges):  # the edges load their drafts
                    time.sleep(0.05)
                    if cpu_seconds(verifier[0]) - busy > 0.02:  # sessions opened: the point runs
                        break
                    busy = cpu_seconds(verifier[0])
                before = {p: cpu_seconds(p) for p in [*verifier[:1], *edges, *redis[:1]]}
                last = dict(before)
                records = {role: self._record(pid, f"p{index}-{role}")
                           for role, pid in (("verifier", verifier[0]), ("edge", edges[0]))}
                while any(Path(f"/proc/{p}").exists() for p in edges):
                    for pid in last:
                        last[pid] = cpu_seconds(pid) or last[pid]
                    time.sleep(0.2)
                for pid in last:
                    last[pid] = cpu_seconds(pid) or last[pid]
                for proc, _ in records.values():
                    proc.send_signal(signal.SIGINT)
                point = {role: classify(proc, path, role) for role, (proc, path) in records.items()}
                point["cpu_s"] = {
                    "verifier": round(last[verifier[0]] - before[verifier[0]], 2),
                    "edges": round(sum(last[p] - before[p] for p in edges), 2),
                    "redis": round(last[redis[0]] - before[redis[0]], 2) if redis else None,
                    "note": "from the verifier's first busy 50 ms after the edges appeared to their exit"}
                self.points.append(point)
                index += 1
            time.sleep(0.2)

    def _record(self, pid: int, tag: str) -> tuple[subprocess.Popen[bytes], Path]:
        path = self.log_dir / f"py-spy-{tag}.txt"
        proc = subprocess.Popen([self.py_spy, "record", "--pid", str(pid), "--nonblocking", "--rate", "50",
                                 "--format", "raw", "--output", str(path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return proc, path


VERIFIER_BUCKETS = [
    ("pass packing and masks", ("build (", "_bucket (", "_block_table (", "allocate_pass (")),
    ("attention (slot attention)", ("attend (",)),
    ("target forward (layers, lm head)", ("_forward (",)),
    ("verification / sampling", ("greedy_outcomes (", "verify_round (", "with_logprobs (",
                                 "flat_round (", "row_argmax (")),
    ("engine other", ("verifier_worker/engine.py",)),
]
EDGE_BUCKETS = [("draft forward", ("torch/", "transformers/"))]
COMMON_BUCKETS = [
    ("redis and broker", ("redis/", "broker/", "hiredis")),
    ("wire format", ("common/wire", "msgpack")),
    ("logging", ("logging/", "structlog", "common/logs")),
    ("thread hand-offs (executor, loop wake-ups)", ("concurrent/futures", "_write_to_self")),
]


def classify(proc: subprocess.Popen[bytes], path: Path, role: str) -> dict[str, Any]:
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=20)
    counts: Counter[str] = Counter()
    if path.exists():
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit() or not stack.strip():
                continue  # a sample with no Python stack (py-spy could not read it)
            counts[bucket(stack, role)] += int(count)
    total = sum(counts.values())
    share = {k: round(v / total, 3) for k, v in counts.most_common()} if total else {}
    return {"samples": total, "share": share}


def bucket(stack: str, role: str) -> str:
    buckets = (VERIFIER_BUCKETS if role == "verifier" else EDGE_BUCKETS) + COMMON_BUCKETS
    if role == "verifier" and "verifier_worker/engine.py" not in stack:
        buckets = COMMON_BUCKETS  # torch frames outside the engine: not the target's pass
    for name, needles in buckets:
        if any(n in stack for n in needles):
            return name
    return "other python (event loop, scheduling, bookkeeping)"


# ---------------------------------------------------------------- report


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Throughput against concurrency ({report['pair']} pair)", "",
             f"{report['machine']}; {report['config']}.", "",
             "| run | order | HF assisted tok/s | " + " | ".join(
                 f"specd {s} sess tok/s" for s in report["sweep"]) + " | 24 ÷ HF |",
             "|---|---|---|" + "---|" * len(report["sweep"]) + "---|"]
    for run in report["runs"]:
        rates = {p["sessions"]: p["tokens_per_s"] for p in run["specd"]["points"]}
        lines.append(f"| {run['rep']} | {run['order']} | {run['hf_assisted']['tokens_per_s']} | "
                     + " | ".join(str(rates.get(s, "-")) for s in report["sweep"])
                     + f" | {run.get('ratio_24_over_hf', '-')} |")
    lines += ["", f"Median ratio (24 sessions ÷ HF assisted): {report.get('median_ratio_24_over_hf')}", ""]
    if report.get("profile"):
        lines += ["## Where the CPU time goes (py-spy, profiled run)", ""]
        for point in report["profile"]["specd"]["points"]:
            verifier = point.get("verifier") or {}
            lines.append(f"* **{point['sessions']} sessions** ({point['tokens_per_s']} tok/s, "
                         f"mean batch {verifier.get('mean_batch_size')}, verifier utilisation "
                         f"{verifier.get('utilisation')}):")
            for role, prof in (point.get("cpu_profile") or {}).items():
                if role == "cpu_s":
                    lines.append(f"  * CPU seconds during the point: {prof}")
                    continue
                shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in prof["share"].items())
                lines.append(f"  * {role} ({prof['samples']} samples): {shares}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", default="tiny")
    parser.add_argument("--target", default="bundled:target")
    parser.add_argument("--draft", default="bundled:draft")
    parser.add_argument("--prompts-file", default=str(PROMPTS))
    parser.add_argument("--prompt-limit", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--edges", type=int, default=4)
    parser.add_argument("--sweep", default="1,4,16,24,64")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--py-spy", default="py-spy")
    parser.add_argument("--out", default=str(RESULTS / "concurrency_sweep"))
    parser.add_argument("--keep-logs", default="",
                        help="a folder for the runs' logs (default: a temporary one)")
    parser.add_argument("--hf-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_child:
        hf_child(args)
        return
    report: dict[str, Any] = {
        "pair": args.pair, "sweep": [int(s) for s in args.sweep.split(",")],
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores shared with other work, "
                   "one torch thread per process",
        "config": f"first {args.prompt_limit} HumanEval prompts, {args.max_new_tokens} new tokens, greedy, "
                  f"gamma {args.gamma}, {args.edges} edges, one verifier, embedded Redis",
        "runs": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        ratios = [r["ratio_24_over_hf"] for r in report["runs"] if "ratio_24_over_hf" in r]
        if ratios:
            report["median_ratio_24_over_hf"] = round(statistics.median(ratios), 3)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(report))

    with (contextlib.nullcontext(args.keep_logs) if args.keep_logs
          else tempfile.TemporaryDirectory(prefix="specd-sweep-")) as tmp:
        for rep in range(args.reps):
            order = ["hf_assisted", "specd"] if rep % 2 == 0 else ["specd", "hf_assisted"]
            run: dict[str, Any] = {"rep": rep, "order": " then ".join(order), "load_before": load_average()}
            for system in order:
                started = time.time()
                if system == "hf_assisted":
                    run["hf_assisted"] = hf_assisted(args)
                else:
                    log_dir = Path(tmp) / f"rep{rep}"
                    log_dir.mkdir()
                    run["specd"] = loadtest(args, log_dir, profile=False)
                print(f"rep {rep} {system}: {time.time() - started:.0f} s", file=sys.stderr, flush=True)
            run["load_after"] = load_average()
            rates = {p["sessions"]: p["tokens_per_s"] for p in run["specd"]["points"]}
            if 24 in rates:
                run["ratio_24_over_hf"] = round(rates[24] / run["hf_assisted"]["tokens_per_s"], 3)
            report["runs"].append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "specd"} | {"specd": rates}),
                  file=sys.stderr, flush=True)
            save()
        if args.profile:
            log_dir = Path(tmp) / "profile"
            log_dir.mkdir()
            report["profile"] = {"specd": loadtest(args, log_dir, profile=True), "load_after": load_average()}
            save()


if __name__ == "__main__":
    main()
