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
