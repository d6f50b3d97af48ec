"""The verifier pool from the outside: `specd pool status` and `specd verifier --workers N`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from typing import Any

from broker.cluster import text
from broker.pool import PoolBroker
from broker.reach import ensure_reachable
from broker.streams import GROUP, make_broker
from common.procs import dies_with_parent
from common.settings import Settings
from specd.signals import forward_stop_signals


async def pool_status(settings: Settings) -> dict[str, Any]:
    """Workers with their load, sessions per worker, KV use, queue depths and per-tenant load."""
    broker = make_broker(settings)
    try:
        await ensure_reachable(broker.redis, settings.redis.url, settings.redis.startup_wait_s)
    except BaseException:
        await broker.close()
        raise
    pool = PoolBroker(broker)
    try:
        fresh = 3 * min(settings.verifier.heartbeat_ttl_s, settings.pool.lease_ms / 1000) + 1
        workers = await pool.loads(fresh_s=fresh)
        redis = broker.redis
        opens_waiting, opens_pending, opens_length = 0, 0, 0
        async for key in redis.scan_iter(match=broker.keys.opens_pattern, count=1000, _type="stream"):
            opens_length += int(await redis.xlen(key))
            for group in await redis.xinfo_groups(key):
                if text(group.get("name")) == GROUP:
                    opens_waiting += int(group.get("lag") or 0)
                    opens_pending += int(group.get("pending") or 0)
        owners = {text(k): text(v) for k, v in (await redis.hgetall(pool.owners_key)).items()}
        tenants: Counter[str] = Counter()
        for load in workers.values():
            tenants.update(load.get("tenants", {}))
        nodes = await redis_nodes(redis)
        return {
            "workers": dict(sorted(workers.items())),
            "sessions": len(owners), "sessions_per_owner": dict(Counter(owners.values())),
            "leases_registered": int(await redis.zcard(pool.leases_key)),
            "lapsed_leases": len(await pool.lapsed(limit=10_000)),
            "opens_waiting": opens_waiting, "opens_pending": opens_pending,
            "sessions_stream_length": opens_length,
            "queued_drafts": sum(int(v.get("queue", 0)) for v in workers.values()),
            "kv_bytes": sum(int(v.get("kv_bytes", 0)) for v in workers.values()),
            "deadletter_length": int(await redis.xlen(pool.deadletter_key)),
            "tenants": dict(tenants), "redis_used_memory": sum(n["used_memory"] for n in nodes),
            "redis_nodes": nodes,
        }
    finally:
        await broker.close()


async def redis_nodes(redis: Any) -> list[dict[str, Any]]:
    """Each Redis node: address, role, memory, commands/s, keys (one entry without a cluster)."""
    from broker.cluster import is_cluster

    targets = redis.get_nodes() if is_cluster(redis) else [None]
    out = []
    for node in targets:
        options = {} if node is None else {"target_nodes": node}
        info = await redis.info(**options)
        if node is not None and isinstance(info, dict) and node.name in info:
            info = info[node.name]
        keys = sum(int(v.get("keys", 0)) for k, v in info.items()
                   if k.startswith("db") and isinstance(v, dict))
        out.append({"node": node.name if node is not None else "single", "role": info.get("role", "?"),
                    "used_memory": int(info.get("used_memory", 0)), "keys": keys,
                    "ops_per_s": int(info.get("instantaneous_ops_per_sec", 0))})
    return sorted(out, key=lambda n: (n["role"] != "master", n["node"]))


def printable(value: Any) -> str:
    """Text for a terminal: control characters (escape sequences another writer of the workers hash
    could have planted) shown escaped, never sent raw."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))


def print_status(status: dict[str, Any]) -> None:
    print(f"{len(status['workers'])} live verifier(s), {status['sessions']} session(s), "
          f"{status['opens_waiting']} open(s) waiting, {status['queued_drafts']} draft(s) queued, "
          f"{status['deadletter_length']} dead letter(s), "
          f"Redis {status['redis_used_memory'] / 2**20:.1f} MiB")
    print(f"{'worker':<32} {'sessions':>8} {'queue':>6} {'load':>6} {'KV tokens':>16} {'KV MiB':>8}  tenants")
    for worker, load in status["workers"].items():
        kv = f"{load.get('resident_tokens', 0)}/{load.get('kv_budget_tokens', 0)}"
        flag = "" if load.get("accepting", True) else " (draining)"
        print(f"{printable(worker) + flag:<32} {load.get('sessions', 0):>8} {load.get('queue', 0):>6} "
              f"{load.get('load', 0):>6.2f} {kv:>16} {load.get('kv_bytes', 0) / 2**20:>8.2f}  "
              f"{json.dumps(load.get('tenants', {}))}")
    if len(status.get("redis_nodes", [])) > 1:
        print(f"{'redis node':<24} {'role':<7} {'keys':>8} {'ops/s':>8} {'MiB':>8}")
        for node in status["redis_nodes"]:
            print(f"{printable(node['node']):<24} {printable(node['role']):<7} {node['keys']:>8} "
                  f"{node['ops_per_s']:>8} {node['used_memory'] / 2**20:>8.1f}")
    if status["tenants"]:
        print("tenants: " + ", ".join(f"{printable(t)}={n}" for t, n in sorted(status["tenants"].items())))


def run_workers(count: int, argv: list[str], base_id: str) -> int:
    """Run ``count`` verifier processes (this command without --workers); forward SIGTERM/SIGINT.

    Each child gets ``--worker-id {base}-{i}``; the parent waits for all and returns the worst
    exit code. A child that dies is not restarted: its sessions fail over to its siblings. The
    children get SIGTERM when the parent dies, even by SIGKILL (Linux: a parent-death signal).
    """
    base = base_id or f"verifier-{os.uname().nodename}-{os.getpid()}"
    children = [subprocess.Popen(dies_with_parent([sys.executable, "-m", "specd", "verifier", *argv,
                                                   "--worker-id", f"{base}-{i}"]))
                for i in range(count)]

    def forward(signum: int) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    forward_stop_signals(forward)
    codes = []
    for child in children:
        while True:
            try:
                codes.append(child.wait())
                break
            except KeyboardInterrupt:  # pragma: no cover - handled by the forwarder
                time.sleep(0.1)
    return max(codes, default=0)


def strip_workers_flag(argv: list[str]) -> list[str]:
    """The verifier's own arguments without ``--workers N`` and ``--worker-id X``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--workers", "--worker-id"):
            skip = True
            continue
        if arg.startswith(("--workers=", "--worker-id=")):
            continue
        out.append(arg)
    return out


