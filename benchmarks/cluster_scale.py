"""One node vs a 3-master Redis Cluster: tokens/s, Redis commands/s per node, and the commands a
verifier issues per loop iteration as the sessions it owns grow (8, 64, 256 by default).

Everything runs in this process: one verifier (the tiny random target of the tests) and an edge
whose sessions draft with the replay drafter (no draft model: only the verifier and Redis
work). The verifier's own client is wrapped to count the commands it sends (pipelined ones one
by one) and its reads (XREADGROUP) apart; each node's INFO commandstats gives the commands it
executed (all clients, script-internal calls included). Run with

    PYTHONPATH=.:tests python benchmarks/cluster_scale.py --sessions 8 64 256 \
        --out benchmarks/results/cluster_scale.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["def add(a, b):", "import os", "class Stack:", "for i in range(10):", "print(x)",
           "import sys", "def f(x):", "while True:", "x = [1, 2, 3]", "return None", "if x > 0:",
           "try:", "with open(p) as f:", "lambda x: x", "async def g():", "yield value"]


class Counter:
    """Counts the commands a redis-py client (single node or cluster) sends, pipelines included."""

    def __init__(self, client: Any) -> None:
        self.total = 0
        self.reads = 0
        self.by_name: dict[str, int] = {}
        self.scripts: dict[str, str] = {}  # sha -> name, filled in by the caller
        inner_execute, inner_pipeline = client.execute_command, client.pipeline

        def count(args: Any) -> None:
            name = _text(args[0]).upper()
            if name == "EVALSHA":
                name = "EVALSHA " + self.scripts.get(_text(args[1]), "?")
            self.total += 1
            self.reads += name == "XREADGROUP"
            self.by_name[name] = self.by_name.get(name, 0) + 1

        async def execute_command(*args: Any, **kwargs: Any) -> Any:
            count(args)
            return await inner_execute(*args, **kwargs)

        def pipeline(*args: Any, **kwargs: Any) -> Any:
            pipe = inner_pipeline(*args, **kwargs)
            inner_run = pipe.execute

            async def execute(*a: Any, **k: Any) -> Any:
                for command in _stack(pipe):
                    count(command)
                return await inner_run(*a, **k)
            pipe.execute = execute
            return pipe

        client.execute_command = execute_command
        client.pipeline = pipeline


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _stack(pipe: Any) -> list[Any]:
    """The queued commands' argument tuples of a single-node or cluster pipeline."""
    stack = getattr(pipe, "command_stack", None)
    if stack is None:
        stack = getattr(getattr(pipe, "_execution_strategy", None), "_command_queue", [])
    return [c[0] if isinstance(c, tuple) else c.args for c in stack]


async def node_calls(urls: list[str]) -> dict[str, int]:
    """Commands each node executed so far (INFO commandstats, summed over commands)."""
    import redis.asyncio as aioredis

    out = {}
    for url in urls:
        client = aioredis.Redis.from_url(url)
        try:
            stats = await client.info("commandstats")
            out[url] = sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_"))
        finally:
            await client.aclose()
    return out


async def point(url: str, node_urls: list[str], target: str, replay: str, sessions: int,
                max_new_tokens: int, gamma: int) -> dict[str, Any]:
    from common.settings import Settings
    from common.wire import SamplingSpec
    from specd.runtime import build_edge, build_verifier, make_broker

    prefix = f"cs{uuid.uuid4().hex[:6]}"
    settings = Settings(redis={"url": url, "key_prefix": prefix},
                        models={"target": target, "draft": target, "torch_threads": 1},
                        verifier={"idle_block_ms": 20, "worker_id": "v-cs",
                                  "max_batch_sessions": 256},
                        sampling={"max_new_tokens": max_new_tokens},
                        edge={"gamma": gamma, "verdict_timeout_s": 300, "backend": "replay",
                              "replay_file": replay, "replay_acceptance": 0.8,
                              "max_concurrent_sessions": sessions, "multiplex_verdicts": True})
    verifier_broker, edge_broker = make_broker(settings), make_broker(settings)
    counter = Counter(verifier_broker.redis)
    verifier = build_verifier(settings, verifier_broker, worker_id="v-cs")
    for owner in (verifier.state.writer, verifier.state.pool):
        for attr, script in vars(owner).items():
            if hasattr(script, "sha") and hasattr(script, "script"):
                counter.scripts[script.sha] = attr.strip("_")
    iterations = {"n": 0, "counted": 0, "total": 0, "reads": 0}
    inner_iterate = verifier.iterate
    measuring = asyncio.Event()

    async def iterate() -> None:
        before, reads = counter.total, counter.reads
        await inner_iterate()
        if measuring.is_set():
            iterations["counted"] += 1
            iterations["total"] += counter.total - before
            iterations["reads"] += counter.reads - reads
    verifier.iterate = iterate  # type: ignore[method-assign]
    counter.by_name.clear()
    stop = asyncio.Event()
    serving = asyncio.create_task(verifier.run(stop))
    edge = build_edge(settings, edge_broker)
    tokenizer = edge.backend.tokenizer
    spec = SamplingSpec(max_new_tokens=max_new_tokens)
    try:
        while verifier.stats.rounds == 0 and not verifier.state.tenant_streams:
            await asyncio.sleep(0.05)
        calls_before = await node_calls(node_urls)
        started = time.perf_counter()
        measuring.set()
        runs = [edge.generate(tokenizer.encode(PROMPTS[i % len(PROMPTS)]), spec) for i in range(sessions)]
        results = await asyncio.gather(*runs, return_exceptions=True)
        wall = time.perf_counter() - started
        measuring.clear()
        calls_after = await node_calls(node_urls)
    finally:
        stop.set()
        await serving
        await verifier_broker.close()
        await edge_broker.close()
    tokens = sum(len(r.token_ids) for r in results if not isinstance(r, BaseException))
    counted = max(1, iterations["counted"])
    return {"sessions": sessions, "errors": sum(isinstance(r, BaseException) for r in results),
            "tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "rounds": verifier.stats.rounds, "forward_passes": verifier.engine.forward_passes,
            "iterations": iterations["counted"],
            "verifier_commands_per_iteration": round(iterations["total"] / counted, 2),
            "verifier_reads_per_iteration": round(iterations["reads"] / counted, 2),
            "verifier_commands_by_name": dict(sorted(counter.by_name.items(), key=lambda kv: -kv[1])),
            "verifier_commands_per_round": round(iterations["total"] / max(1, verifier.stats.rounds),
                                                 2),
            "node_commands_per_s": {_port(u): round((calls_after[u] - calls_before[u]) / wall)
                                    for u in node_urls},
            "node_commands_per_iteration": {_port(u): round((calls_after[u] - calls_before[u]) / counted, 2)
                                            for u in node_urls}}


def _port(url: str) -> str:
    return url.rsplit(":", 1)[1].split("/")[0]


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import conftest  # one torch thread
    import tiny_models
    from redis_cluster import RedisCluster

    from common.settings import Settings
    from specd.replay import make_replay

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--redis", choices=["both", "one-node"], default="both",
                        help="one-node: no cluster (also runs on code without cluster mode, for old vs new)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cluster-scale-"))
    tokenizer = tiny_models.build_tokenizer()
    target = str(tiny_models.save(tiny_models.random_model(tokenizer, seed=1), tokenizer, root / "target"))
    replay = root / "replay.json"
    make_replay(Settings(models={"target": target, "draft": target, "torch_threads": 1},
                         sampling={"max_new_tokens": args.max_new_tokens}), PROMPTS, replay)
    server = shutil.which("redis-server") or "redis-server"
    single, port = conftest.start_redis_server(root)
    cluster = RedisCluster(root / "cluster", server).start() if args.redis == "both" else None
    rows = []
    try:
        one = f"redis://127.0.0.1:{port}/0"
        setups = [("one node", one, [one])]
        if cluster is not None:
            setups.append(("3-master cluster", cluster.url,
                           [f"redis://127.0.0.1:{p}/0" for p in cluster.masters()]))
        for sessions in args.sessions:
            for name, url, nodes in setups:
                row = {"redis": name, **asyncio.run(point(url, nodes, target, str(replay), sessions,
                                                          args.max_new_tokens, args.gamma))}
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        if cluster is not None:
            cluster.stop()
        single.terminate()
        single.wait(timeout=10)
    report = {"max_new_tokens": args.max_new_tokens, "gamma": args.gamma,
              "drafter": "replay (acceptance 0.8)", "target": "tiny random Llama of the tests", "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
