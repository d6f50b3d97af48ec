"""A Redis Cluster master SIGKILLed mid-run: every session finishes exact, none lost or repeated.

A real 3-master / 3-replica cluster on loopback (tests/redis_cluster.py), one verifier and an
edge in this process, ``--sessions`` greedy sessions in flight. Once every session has had a
verdict, the master serving the most sessions' slots is SIGKILLed; its replica is promoted
after the node timeout (1 s here). Reports the time from the kill to the next verdict (any
session, and the sessions whose keys lived on the killed master), checks each output against
target-only greedy decoding and that the tokens streamed to the edge are exactly the final
output (none repeated or changed), and prints one JSON object. Used by
tests/integration/test_cluster.py; run it alone with

    PYTHONPATH=.:tests python benchmarks/cluster_failover.py --sessions 32 \
        --out benchmarks/results/cluster_failover.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

PROMPTS = ["def add(a, b):", "import os", "class Stack:", "for i in range(10):", "print(x)",
           "import sys", "def f(x):", "while True:", "x = [1, 2, 3]"]


async def run_master_kill(cluster: Any, target: str, draft: str, sessions: int = 32,
                          max_new_tokens: int = 48, gamma: int = 3) -> dict[str, Any]:
    from common.sampling import SamplingParams
    from common.settings import Settings
    from common.wire import SamplingSpec
    from specd.runtime import build_edge, build_verifier, make_broker
    from verifier_worker.engine import generate_target_only

    prefix = f"cf{uuid.uuid4().hex[:6]}"
    settings = Settings(redis={"url": cluster.url, "key_prefix": prefix, "socket_timeout_s": 10.0},
                        models={"target": target, "draft": draft, "torch_threads": 1},
                        verifier={"idle_block_ms": 20, "worker_id": "v-cf"},
                        edge={"gamma": gamma, "verdict_timeout_s": 60, "resend_after_s": 1.0,
                              "max_concurrent_sessions": sessions})
    verifier_broker, edge_broker = make_broker(settings), make_broker(settings)
    verifier = build_verifier(settings, verifier_broker, worker_id="v-cf")
    stop = asyncio.Event()
    serving = asyncio.create_task(verifier.run(stop))
    edge = build_edge(settings, edge_broker)
    tokenizer = edge.backend.tokenizer
    sids = [f"default.cf{i:03d}{uuid.uuid4().hex[:8]}" for i in range(sessions)]
    prompts = {sid: PROMPTS[i % len(PROMPTS)] for i, sid in enumerate(sids)}
    seen: dict[str, list[float]] = {sid: [] for sid in sids}
    streamed: dict[str, list[int]] = {sid: [] for sid in sids}

    def on_tokens(sid: str, tokens: list[int]) -> None:
        seen[sid].append(time.monotonic())
        streamed[sid].extend(tokens)

    spec = SamplingSpec(max_new_tokens=max_new_tokens)
    try:
        runs = asyncio.gather(*(edge.generate(tokenizer.encode(prompts[sid]), spec, on_tokens,
                                              session_id=sid) for sid in sids), return_exceptions=True)
        waited = time.monotonic()
        while not all(seen.values()):
            await asyncio.sleep(0.01)
            if time.monotonic() - waited > 120:
                raise RuntimeError(f"sessions without a verdict before the kill: "
                                   f"{[s for s, v in seen.items() if not v]}")
        homes = {sid: cluster.master_of(edge_broker.keys.drafts(sid)) for sid in sids}
        victim = Counter(homes.values()).most_common(1)[0][0]
        killed_at = time.monotonic()
        cluster.kill(victim)
        promoted = asyncio.create_task(asyncio.to_thread(_wait_promotion, cluster, killed_at))
        results = await runs
        promotion_s = await promoted
        stop.set()
        await serving
    finally:
        stop.set()
        await verifier_broker.close()
        await edge_broker.close()
    affected = [sid for sid in sids if homes[sid] == victim]
    failed = {sid: repr(r) for sid, r in zip(sids, results, strict=True) if isinstance(r, BaseException)}
    mismatches, repeated = [], []
    for sid, result in zip(sids, results, strict=True):
        if isinstance(result, BaseException):
            continue
        reference = generate_target_only(verifier.engine, tokenizer.encode(prompts[sid]), SamplingParams(),
                                         frozenset(), max_new_tokens)
        if result.token_ids != reference:
            mismatches.append(sid)
        if streamed[sid] != result.token_ids:
            repeated.append(sid)

    def next_after(group: list[str]) -> float | None:
        after = [t for sid in group for t in seen[sid] if t > killed_at]
        return round(min(after) - killed_at, 3) if after else None

    return {"sessions": sessions, "masters": 3, "replicas": 3, "max_new_tokens": max_new_tokens,
            "gamma": gamma, "sessions_on_killed_master": len(affected),
            "finished_sessions": sum(1 for r in results if not isinstance(r, BaseException)
                                     and r.finish_reason is not None),
            "failed": failed, "mismatches": mismatches, "streamed_not_equal_final": repeated,
            "kill_to_promotion_s": promotion_s,
            "kill_to_next_verdict_s": next_after(sids),
            "kill_to_next_verdict_on_killed_master_s": next_after(affected),
            "kill_to_last_affected_resumed_s": max(
                (round(min(t for t in seen[sid] if t > killed_at) - killed_at, 3)
                 for sid in affected if any(t > killed_at for t in seen[sid])), default=None),
            "verifier": {"repairs": verifier.stats.repairs, "duplicates": verifier.stats.duplicates,
                         "fenced": verifier.stats.fenced, "leases_retaken": verifier.stats.leases_retaken,
                         "sessions_lost": verifier.stats.sessions_lost},
            "edge_resends": sum(getattr(r, "resends", 0) for r in results
                                if not isinstance(r, BaseException)),
            "victim_port": victim}


def _wait_promotion(cluster: Any, killed_at: float, timeout: float = 60.0) -> float | None:
    """Seconds from the kill until the cluster again has three live masters (the replica took over)."""
    while time.monotonic() - killed_at < timeout:
        if len(cluster.masters()) == 3:
            return round(time.monotonic() - killed_at, 3)
        time.sleep(0.05)
    return None


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tiny_models
    from redis_cluster import RedisCluster

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cluster-failover-"))
    tokenizer = tiny_models.build_tokenizer()
    model = tiny_models.random_model(tokenizer, seed=1)
    target = str(tiny_models.save(model, tokenizer, root / "target"))
    draft = str(tiny_models.save(tiny_models.perturbed_copy(model, 2, 0.35), tokenizer, root / "draft"))
    import shutil

    cluster = RedisCluster(root / "cluster", shutil.which("redis-server") or "redis-server").start()
    try:
        report = asyncio.run(run_master_kill(cluster, target, draft, args.sessions, args.max_new_tokens))
    finally:
        cluster.stop()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
