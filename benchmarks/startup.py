"""Start-up time of a verifier with the real target (SmolLM2-135M-Instruct from its GGUF file).

A cold start finds an empty cache folder: it hashes the GGUF file, dequantises it with
transformers' GGUF loader and writes the save_pretrained copy. A warm start finds that copy (and
the remembered SHA-256) and loads plain safetensors. Each start is a real ``specd verifier``
process against a private redis-server, timed from launch to its ``verifier.started`` log line
(imports, model load, KV arena, Redis set-up: everything before it serves), then stopped.
Writes benchmarks/results/startup.json and .md:

    PYTHONPATH=. python benchmarks/startup.py --cold 2 --warm 3

The runs alternate cold and warm, one torch thread each (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is missing (apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(workdir)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def one_start(url: str, cache: Path, model: str, threads: int, kv_tokens: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads),
           "SPECD_MODELS__TORCH_THREADS": str(threads), "SPECD_EDGE__CACHE_DIR": str(cache),
           "SPECD_POOL__KV_BUDGET_TOKENS": str(kv_tokens), "SPECD_VERIFIER__ACL_CHECK": "off"}
    cold = not any((cache / "gguf").glob("*/specd-gguf.json"))
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "specd", "verifier", "--redis-url", url,
                                "--target-model", model, "--log-format", "json"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    events: dict[str, float] = {}
    assert process.stderr is not None
    try:
        for line in process.stderr:
            try:
                event = json.loads(line).get("event", "")
            except ValueError:
                continue
            events.setdefault(event, round(time.perf_counter() - started, 3))
            if event == "verifier.started":
                break
        else:
            raise RuntimeError(f"the verifier exited ({process.wait()}) before it started")
    finally:
        process.terminate()
        process.wait(timeout=60)
    return {"kind": "cold" if cold else "warm", "seconds": events["verifier.started"],
            "dequantise_began_s": events.get("model.gguf_dequantising")}


def in_process_loads(model: str, repeats: int) -> list[float]:
    """Seconds of ``load_causal_lm`` alone (imports done, cache warm): the part the cache saves."""
    import torch

    from common.models import load_causal_lm, resolve_model_path

    torch.set_num_threads(1)
    resolve_model_path(model)  # fills the default cache if it is cold
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        load_causal_lm(model)
        times.append(round(time.perf_counter() - started, 3))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="named model or .gguf file")
    parser.add_argument("--cold", type=int, default=2, help="cold starts (each with an empty cache)")
    parser.add_argument("--warm", type=int, default=3, help="warm starts")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kv-tokens", type=int, default=4096, help="pool.kv_budget_tokens")
    parser.add_argument("--out", type=Path, default=RESULTS / "startup.json")
    parser.add_argument("--in-process", type=int, default=0, metavar="N",
                        help="only time N warm load_causal_lm calls in this process, print them")
    args = parser.parse_args()
    if args.in_process:
        print(json.dumps({"model": args.model, "warm_load_s": in_process_loads(args.model, args.in_process),
                          "load_average": os.getloadavg()}))
        return
    scratch = Path(tempfile.mkdtemp(prefix="specd-startup-"))
    redis, url = start_redis(scratch)
    runs: list[dict[str, Any]] = []
    try:
        warm_cache = scratch / "warm-cache"
        one_start(url, warm_cache, args.model, args.threads, args.kv_tokens)  # fills the warm cache
        for index in range(max(args.cold, args.warm)):  # alternate: both see the same load
            if index < args.cold:
                cold_cache = scratch / f"cold-{index}"
                runs.append(one_start(url, cold_cache, args.model, args.threads, args.kv_tokens))
                shutil.rmtree(cold_cache, ignore_errors=True)
            if index < args.warm:
                runs.append(one_start(url, warm_cache, args.model, args.threads, args.kv_tokens))
            print(runs[-1], flush=True)
    finally:
        redis.terminate()
        redis.wait()
        shutil.rmtree(scratch, ignore_errors=True)
    summary = {kind: sorted(r["seconds"] for r in runs if r["kind"] == kind) for kind in ("cold", "warm")}
    report = {"model": args.model, "threads": args.threads, "kv_budget_tokens": args.kv_tokens,
              "cpus": os.cpu_count(), "load_average": os.getloadavg(), "runs": runs, "seconds": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    lines = ["| start | runs (s, launch to verifier.started) | median (s) |", "|---|---|---|"]
    for kind, values in summary.items():
        if values:
            each = ", ".join(f"{v:.1f}" for v in values)
            lines.append(f"| {kind} | {each} | {values[len(values) // 2]:.1f} |")
    args.out.with_suffix(".md").write_text(
        f"Verifier start-up with {args.model} ({args.threads} torch thread, {os.cpu_count()} CPUs, load "
        f"average {os.getloadavg()[0]:.1f} at the end):\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
