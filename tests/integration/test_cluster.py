"""specd on a real 3-master / 3-replica Redis Cluster on loopback (tests/redis_cluster.py).

The greedy exactness test and the 3-verifier SIGKILL failover test run as they do on one node;
then a master is SIGKILLed mid-run with 32 sessions in flight (benchmarks/cluster_failover.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import test_pipeline  # noqa: E402
import test_pool_failover  # noqa: E402


async def test_greedy_exactness_on_a_cluster(redis_cluster, tiny_pair) -> None:
    greedy = test_pipeline.test_greedy_speculative_equals_target_greedy_in_shared_batches
    await greedy(redis_cluster.url, tiny_pair)


async def test_verifier_sigkill_failover_on_a_cluster(redis_cluster, tiny_pair, tmp_path) -> None:
    failover = test_pool_failover.test_sigkill_mid_batch_loses_nothing_and_outputs_stay_exact
    await failover(redis_cluster.url, tiny_pair, tmp_path)


async def test_pool_status_lists_the_cluster_nodes(redis_cluster, capsys) -> None:
    from common.settings import Settings
    from specd.pool import pool_status, print_status

    status = await pool_status(Settings(redis={"url": redis_cluster.url, "key_prefix": "ps"}))
    roles = [n["role"] for n in status["redis_nodes"]]
    assert roles.count("master") == 3  # replicas are listed once the client's slot map has them
    print_status(status)
    assert capsys.readouterr().out.count("127.0.0.1:") == len(roles)


async def test_master_sigkill_mid_run_loses_no_token(redis_cluster, tiny_pair) -> None:
    """Last in this file: it leaves the cluster with a promoted replica (then restarts the node)."""
    from cluster_failover import run_master_kill

    report = await run_master_kill(redis_cluster, tiny_pair["target"], tiny_pair["draft"], sessions=32)
    redis_cluster.restart(report["victim_port"])  # it rejoins as its promoted replica's replica
    print(f"\nmaster killed: {report['sessions_on_killed_master']} session(s) on it, next verdict "
          f"{report['kill_to_next_verdict_s']} s, on the killed master "
          f"{report['kill_to_next_verdict_on_killed_master_s']} s")
    assert report["sessions_on_killed_master"] >= 1
    assert report["failed"] == {}
    assert report["finished_sessions"] == 32
    assert report["mismatches"] == []  # every greedy output equals target-only greedy decoding
    assert report["streamed_not_equal_final"] == []  # no token lost, repeated or changed on the way
