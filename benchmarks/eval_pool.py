"""`specd eval` against a running pool: a redis-server and 2 `specd verifier` processes, the same
suite at several --concurrency values, one after the other; outputs compared run to run and with
a reference run's records (e.g. the embedded run's target-only outputs). Prints and writes JSON.

    PYTHONPATH=. python benchmarks/eval_pool.py --data ../shared/data/specbench_questions.jsonl \
        --concurrency 16,1 --max-new-tokens 32 --reference benchmarks/results/eval/specbench/records.jsonl \
        --out benchmarks/results/eval/pool
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server did not start on port {port}")


def env_for(url: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "SPECD_REDIS__URL": url,
            "SPECD_MODELS__TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", "SPECD_LOG__LEVEL": "warning"}


def start_pool(workdir: Path, verifiers: int) -> tuple[str, list[subprocess.Popen[bytes]]]:
    port = free_port()
    redis = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                              "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    url = f"redis://127.0.0.1:{port}/0"
    processes = [redis]
    for i in range(verifiers):
        log = open(workdir / f"verifier-{i}.log", "wb")  # noqa: SIM115 - closed with the process
        processes.append(subprocess.Popen([sys.executable, "-m", "specd", "verifier", "--worker-id", f"v{i}"],
                                          env=env_for(url), stdout=log, stderr=log))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # every verifier has a heartbeat
        checks = [subprocess.run([sys.executable, "-m", "specd", "verifier", "--check", "--worker-id",
                                  f"v{i}"], env=env_for(url), capture_output=True).returncode
                  for i in range(verifiers)]
        if not any(checks):
            break
        time.sleep(1)
    return url, processes


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """The verifiers first (they drain through Redis), then redis-server."""
    redis, verifiers = processes[0], processes[1:]
    for group in (verifiers, [redis]):
        for p in group:
            p.send_signal(signal.SIGTERM)
        for p in group:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def outputs(path: Path, mode: str) -> dict[str, list[int]]:
    found = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "error" in record:
            continue
        block = record[mode][0] if mode == "speculative" else record[mode]
        found[str(record["question_id"])] = block["token_ids"]
    return found


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--suite", default="specbench")
    parser.add_argument("--concurrency", default="16,1")
    parser.add_argument("--verifiers", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--reference", type=Path, help="records of another run to compare with")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--extra", default="", help="more `specd eval` flags, space-separated")
    parser.add_argument("--resume", action="store_true", help="--resume the runs (retry failed questions)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    url, processes = start_pool(args.out, args.verifiers)
    report: dict[str, Any] = {"verifiers": args.verifiers, "max_new_tokens": args.max_new_tokens, "runs": {}}
    if args.resume and (args.out / "report.json").exists():  # the other runs' figures stay
        report = json.loads((args.out / "report.json").read_text())
    try:
        for c in [int(x) for x in args.concurrency.split(",")]:
            out = args.out / f"c{c}"
            command = [sys.executable, "-m", "specd", "eval", "--suite", args.suite, "--data", str(args.data),
                       "--redis-url", url, "--modes", "speculative", "--concurrency", str(c),
                       "--max-new-tokens", str(args.max_new_tokens), "--out", str(out),
                       "--resume" if args.resume else "--overwrite",
                       "--no-progress", "--json", *args.extra.split()]
            started = time.perf_counter()
            result = subprocess.run(command, env=env_for(url), capture_output=True, text=True)
            wall = time.perf_counter() - started
            (out / "stderr.txt").write_text(result.stderr)
            summary = json.loads(result.stdout) if result.returncode in (0, 1) else {}
            if str(c) in report["runs"]:  # resumed: keep the first run's timing
                report.setdefault("first_runs", {})[str(c)] = report["runs"][str(c)]
            report["runs"][str(c)] = {"concurrency": c, "returncode": result.returncode,
                                      "process_wall_s": round(wall, 3), "run": summary.get("run"),
                                      "counts": summary.get("counts")}
            print(json.dumps({"concurrency": c, "wall_s": round(wall, 1), "rc": result.returncode}),
                  file=sys.stderr, flush=True)
    finally:
        stop(processes)
    runs = {c: outputs(args.out / f"c{c}" / "records.jsonl", "speculative") for c in report["runs"]}
    first = next(iter(runs.values()))
    report["identical_across_concurrency"] = all(r == first for r in runs.values())
    report["questions"] = len(first)
    if args.reference:
        for mode in ("target", "speculative"):
            ref = outputs(args.reference, mode)
            report[f"equal_to_reference_{mode}"] = {
                c: sum(ref.get(q) == ids for q, ids in r.items()) for c, r in runs.items()}
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
