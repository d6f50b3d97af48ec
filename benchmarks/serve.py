"""The HTTP layer's cost: `specd serve` beside the same load sent straight to the pipeline.

One Redis (embedded) and one `specd verifier` process serve both sides, one after the other at
each point:
  * serve: one `specd serve` process (its edge drafts every request's session); C concurrent
    streaming clients (raw HTTP/SSE, greedy) each send requests back to back until N are done;
    time to first token is measured at the client (request sent -> first text chunk), and the
    server's own session-start-to-first-round is reported beside it;
  * pipeline: `specd loadtest` (its library) with one edge process running C concurrent sessions
    of the same prompts, against the same verifier (`--no-verifiers`); its TTFT is session start
    -> first round.
Requests/s is completed requests over the span from the first start to the last finish.

    PYTHONPATH=. python benchmarks/serve.py --concurrency 1,8,32 --max-new-tokens 64

Results: ``benchmarks/results/serve.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx

from broker.embedded import EmbeddedRedis
from common.settings import load_settings
from specd.demo import DEFAULT_PROMPTS
from specd.loadreport import percentiles
from specd.loadtest import LoadTestOptions, run_loadtest
from specd.prompts import read_prompts

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HUMANEVAL = ROOT.parent / "shared" / "data" / "humaneval.json"  # ../shared beside the checkout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECD_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", SPECD_MODELS__TORCH_THREADS="1",
               SPECD_REDIS__URL=url, SPECD_LOG__FORMAT="json", SPECD_LOG__LEVEL="warning",
               PYTHONUNBUFFERED="1")
    return env


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Any:
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "specd", *args], env=env, stdout=out, stderr=out)
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def wait_healthy(url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url + "/health")).status_code == 200:
                    return
            await asyncio.sleep(0.3)
    raise TimeoutError("specd serve did not become healthy")


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": "bundled:target", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    started = time.perf_counter()
    first, figures, text = None, {}, []
    async with client.stream("POST", url + "/v1/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            piece = chunk["choices"][0]["text"]
            if piece and first is None:
                first = time.perf_counter()
            text.append(piece)
            if chunk["choices"][0]["finish_reason"]:
                figures = chunk["specd"]
    finished = time.perf_counter()
    return {"started": started, "finished": finished, "ttft_ms": ((first or finished) - started) * 1000,
            "server_ttft_ms": figures.get("ttft_ms", 0.0), "tokens": figures.get("tokens", 0),
            "text": "".join(text)}


async def serve_point(url: str, prompts: list[str], concurrency: int, requests: int,
                      max_tokens: int) -> dict[str, Any]:
    queue = list(range(requests))
    results: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def worker() -> None:
            while queue:
                index = queue.pop(0)
                results.append(await one_request(client, url, prompts[index % len(prompts)], max_tokens))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    span = max(r["finished"] for r in results) - min(r["started"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"path": "specd serve (HTTP/SSE)", "concurrency": concurrency, "requests": len(results),
            "wall_s": round(span, 3), "requests_per_s": round(len(results) / span, 3),
            "tokens_per_s": round(tokens / span, 2), "ttft_ms": percentiles([r["ttft_ms"] for r in results]),
            "server_session_ttft_ms": percentiles([r["server_ttft_ms"] for r in results])}


async def pipeline_point(redis_url: str, prompts: list[str], concurrency: int, requests: int,
                         max_tokens: int, log_dir: Path) -> dict[str, Any]:
    settings = load_settings({"redis": {"url": redis_url}, "sampling": {"max_new_tokens": max_tokens,
                                                                         "temperature": 0.0},
                              "models": {"torch_threads": 1}})
    options = LoadTestOptions(edges=1, sessions_per_edge=concurrency, prompts=requests,
                              prompt_texts=prompts, start_verifiers=False, log_dir=log_dir, progress=False)
    report = await run_loadtest(settings, options, out=io.StringIO())
    point = report["points"][0]
    return {"path": "pipeline (specd loadtest, 1 edge process)", "concurrency": concurrency,
            "requests": point["completed_sessions"], "wall_s": point["wall_s"],
            "requests_per_s": round(point["completed_sessions"] / point["wall_s"], 3),
            "tokens_per_s": point["tokens_per_s"], "ttft_ms": point["ttft_ms"],
            "errors": point["error_count"]}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    source = args.prompts_file if args.prompts_file.is_file() else None
    prompts = (read_prompts(source, "text") if source else list(DEFAULT_PROMPTS))[: args.prompts]
    work = Path(tempfile.mkdtemp(prefix="specd-bench-serve-"))
    rows, load_before = [], os.getloadavg()
    with EmbeddedRedis() as redis:
        env = _env(redis.url)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        with process(["verifier"], env, work / "verifier.log"), \
                process(["serve", "--port", str(port), "--max-concurrent", str(max(args.concurrency) + 8)],
                        env, work / "serve.log"):
            await wait_healthy(url)
            await serve_point(url, prompts, 2, 4, args.max_new_tokens)  # warm-up, not reported
            for concurrency in args.concurrency:
                requests = max(args.min_requests, 2 * concurrency)
                served = await serve_point(url, prompts, concurrency, requests, args.max_new_tokens)
                direct = await pipeline_point(redis.url, prompts, concurrency, requests, args.max_new_tokens,
                                              work / f"loadtest-{concurrency}")
                for row in (served, direct):
                    print(_line(row), file=sys.stderr, flush=True)
                rows += [served, direct]
    return {"benchmark": "serve", "command": " ".join(sys.argv), "max_new_tokens": args.max_new_tokens,
            "prompts": len(prompts), "prompt_source": source.name if source else "specd demo's prompts",
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "platform": platform.platform(),
                        "load_average_1m_before_after": [round(load_before[0], 2),
                                                         round(os.getloadavg()[0], 2)]},
            "models": {"target": "bundled:target", "draft": "bundled:draft"}, "rows": rows}


def _line(row: dict[str, Any]) -> str:
    return (f"{row['path']:42} c={row['concurrency']:>3} {row['requests']:>3} req "
            f"{row['requests_per_s']:7.2f} req/s {row['tokens_per_s']:8.1f} tok/s "
            f"ttft p50 {row['ttft_ms']['p50']:7.1f} p95 {row['ttft_ms']['p95']:7.1f} ms")


def markdown(report: dict[str, Any]) -> str:
    lines = ["# specd serve vs the pipeline", "",
             f"`{report['command']}`: {report['prompts']} prompts of {report['prompt_source']} "
             "(cycled), greedy, "
             f"{report['max_new_tokens']} new tokens, bundled pair, one verifier process, one edge process "
             "(specd serve, or the load test's edge), embedded Redis, one torch thread per process; "
             f"{report['machine']['cpus']} CPUs, 1-minute load average "
             f"{report['machine']['load_average_1m_before_after']} before/after.", "",
             "| path | concurrent clients | requests | requests/s | tokens/s | TTFT p50 ms | TTFT p95 ms |"
             " server session TTFT p50 ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        server = row.get("server_session_ttft_ms")
        server_p50 = f"{server['p50']:.1f}" if server else "–"
        ttft = row["ttft_ms"]
        lines.append(f"| {row['path']} | {row['concurrency']} | {row['requests']} | "
                     f"{row['requests_per_s']:.2f} | {row['tokens_per_s']:.1f} | {ttft['p50']:.1f} | "
                     f"{ttft['p95']:.1f} | {server_p50} |")
    lines += ["", "TTFT: serve measures at the client (request sent to first text chunk, HTTP included); "
              "the pipeline measures session start to first verified round (as does the server-side column).",
              ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=32, help="distinct prompts (cycled)")
    parser.add_argument("--prompts-file", type=Path, default=HUMANEVAL, help="default: HumanEval")
    parser.add_argument("--min-requests", type=int, default=16, help="requests per point (at least 2 x C)")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
