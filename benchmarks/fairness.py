"""Tenant fairness: tenant B's round latency alone vs. next to tenant A running 10x its sessions.

One verifier process with a small batch budget (so it binds) serves tenant B's sessions alone,
then B's sessions together with A's; the edge-measured round latency (send to verdict, drafting
excluded) of B is compared. Tenant A's edges use the replay drafter by default (``--a-drafter``):
A's edge devices are other machines in a deployment, and on one small box their draft model would
otherwise take the verifier's cores, which would measure CPU contention rather than the
scheduler. B drafts with the real draft model. Writes benchmarks/results/fairness.json. For real
figures:

    PYTHONPATH=. python benchmarks/fairness.py --b-sessions 4 --ratio 10 --max-new-tokens 64

(tiny random models unless --target/--draft; a private redis-server unless --redis-url.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from failover import PROMPTS, ROOT, run_with_pool, start_verifiers, wait_for_workers, worker_env


async def tenant_rounds(client: Any, sessions: int, max_new_tokens: int, offset: int = 0) -> list[Any]:
    from common.wire import SamplingSpec

    tokenizer = client.backend.tokenizer
    spec = SamplingSpec(max_new_tokens=max_new_tokens)
    results = await asyncio.gather(*(client.generate(tokenizer.encode(PROMPTS[(i + offset) % len(PROMPTS)]),
                                                     spec) for i in range(sessions)))
    return list(results)


def edge_rounds(results: list[Any]) -> list[float]:
    """Per round, send to verdict as the edge saw it (drafting excluded)."""
    return [ms for r in results for ms in r.round_ms]


def queue_ms_per_round(results: list[Any]) -> float:
    """Wait from send to the start of the pass: what the scheduler decides (pass time excluded)."""
    rounds = sum(r.rounds for r in results)
    return (sum(r.queue_ms for r in results) / rounds) if rounds else 0.0


def verifier_ms_per_round(results: list[Any]) -> float:
    """Verifier-side latency per round (queue + pass), free of the edge process's own contention."""
    rounds = sum(r.rounds for r in results)
    return (sum(r.queue_ms + r.verify_ms for r in results) / rounds) if rounds else 0.0


async def run(url: str, target: str, draft: str, args: argparse.Namespace) -> dict[str, Any]:
    from broker.pool import PoolBroker
    from common.settings import Settings
    from edge_worker.client import EdgeClient, EdgeConfig
    from specd.runtime import build_edge, make_broker

    prefix = "fair"
    env = worker_env(url, target, draft, prefix, 3000)
    env["SPECD_VERIFIER__MAX_BATCH_SESSIONS"] = str(args.max_batch_sessions)
    processes = start_verifiers(1, env, Path(tempfile.mkdtemp(prefix="fairness-")))
    a_sessions = args.b_sessions * args.ratio  # rounded up to a multiple of --a-clients
    settings = Settings(redis={"url": url, "key_prefix": prefix},
                        models={"target": target, "draft": draft, "torch_threads": 1},
                        edge={"gamma": args.gamma, "verdict_timeout_s": 300,
                              "max_concurrent_sessions": a_sessions, "tenant": "B"})
    broker = make_broker(settings)
    try:
        await wait_for_workers(PoolBroker(broker), {"v0"}, processes, timeout=180)
        b = build_edge(settings, broker)
        # Several A clients (each drafts on its own lock) so that A's offered load is not capped
        # by one client's serialised drafting.
        config = EdgeConfig(gamma=args.gamma, verdict_timeout_s=300, tenant="A", target_model=target)
        per_client = -(-a_sessions // args.a_clients)
        a_backend = b.backend if args.a_drafter == "model" else replay_backend(
            settings, target, args, per_client)
        a_clients = [EdgeClient(a_backend, broker, config, per_client) for _ in range(args.a_clients)]
        alone = await tenant_rounds(b, args.b_sessions, args.max_new_tokens)
        a_runs = [tenant_rounds(a, per_client, args.max_new_tokens * 2, i) for i, a in enumerate(a_clients)]
        *a_lists, crowded = await asyncio.gather(*a_runs,
                                                 tenant_rounds(b, args.b_sessions, args.max_new_tokens))
        a_results = [r for rounds in a_lists for r in rounds]
    finally:
        for process in processes.values():
            process.terminate()
            process.wait(timeout=60)
        await broker.close()
    b_alone, b_crowded = statistics.median(edge_rounds(alone)), statistics.median(edge_rounds(crowded))
    v_alone, v_crowded = verifier_ms_per_round(alone), verifier_ms_per_round(crowded)
    return {"a_sessions": a_sessions, "a_clients": args.a_clients, "b_sessions": args.b_sessions,
            "max_batch_sessions": args.max_batch_sessions, "gamma": args.gamma,
            "b_median_round_ms_alone": round(b_alone, 2), "b_median_round_ms_with_a": round(b_crowded, 2),
            "a_median_round_ms": round(statistics.median(edge_rounds(a_results)), 2),
            "b_ratio": round(b_crowded / b_alone, 3),
            "b_verifier_ms_per_round_alone": round(v_alone, 2),
            "b_verifier_ms_per_round_with_a": round(v_crowded, 2),
            "a_verifier_ms_per_round": round(verifier_ms_per_round(a_results), 2),
            "b_verifier_ratio": round(v_crowded / v_alone, 3) if v_alone else None,
            "b_queue_ms_per_round_alone": round(queue_ms_per_round(alone), 2),
            "b_queue_ms_per_round_with_a": round(queue_ms_per_round(crowded), 2),
            "a_queue_ms_per_round": round(queue_ms_per_round(a_results), 2),
            "a_drafter": args.a_drafter, "a_replay_acceptance": args.a_acceptance}


def replay_backend(settings: Any, target: str, args: argparse.Namespace, per_client: int) -> Any:
    """A replay drafter over exactly the prompts tenant A's sessions use."""
    from edge_worker.backends import create_backend
    from specd.replay import make_replay

    prompts = [PROMPTS[(i + offset) % len(PROMPTS)]
               for offset in range(args.a_clients) for i in range(per_client)]
    path = Path(tempfile.mkdtemp(prefix="fairness-replay-")) / "a.replay"
    replay_settings = settings.model_copy(deep=True)
    replay_settings.sampling.max_new_tokens = args.max_new_tokens * 2
    make_replay(replay_settings, prompts, path)
    return create_backend("replay", target, replay_file=str(path), replay_acceptance=args.a_acceptance)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--target", default="")
    parser.add_argument("--draft", default="")
    parser.add_argument("--b-sessions", type=int, default=2)
    parser.add_argument("--ratio", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--gamma", type=int, default=3)
    parser.add_argument("--a-clients", type=int, default=4, help="edge clients A's sessions spread over")
    parser.add_argument("--max-batch-sessions", type=int, default=4)
    parser.add_argument("--a-drafter", choices=("replay", "model"), default="replay",
                        help="tenant A's edges: replay drafter (no model compute) or the draft model")
    parser.add_argument("--a-acceptance", type=float, default=0.6,
                        help="replay drafter: per-token acceptance of A's drafts")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fairness.json")
    args = parser.parse_args()
    report = run_with_pool(args, lambda url, target, draft: run(url, target, draft, args))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
