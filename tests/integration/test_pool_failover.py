"""`specd verifier --workers 3` on a real Redis; one worker is SIGKILLed mid-batch; nothing is lost.

Also covers `specd pool status --json` (run as a process while the pool serves) and SIGTERM
forwarding by the --workers parent.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from failover import run_failover  # noqa: E402


async def test_sigkill_mid_batch_loses_nothing_and_outputs_stay_exact(redis_url, tiny_pair, tmp_path) -> None:
    report = await run_failover(redis_url, tiny_pair["target"], tiny_pair["draft"], workers=3, sessions=9,
                                max_new_tokens=32, gamma=3, lease_ms=1500, log_dir=tmp_path)
    print(f"\nfailover: {report['orphaned_sessions']} orphaned session(s), takeover "
          f"first {report['takeover_first_s']} s, last {report['takeover_last_s']} s "
          f"(lease {report['lease_ms']} ms): {report['takeover_s']}")
    assert report["orphaned_sessions"] >= 1
    assert report["finished_sessions"] == 9
    assert report["mismatches"] == []  # every greedy output equals target-only greedy decoding
    assert len(report["takeover_s"]) == report["orphaned_sessions"]
    assert report["status_workers"] == ["v-0", "v-1", "v-2"]
    fields = {"sessions", "queue", "kv_bytes", "resident_tokens", "tenants", "load"}
    assert fields <= set(report["status_fields"])
    assert report["parent_exit"] == 0  # the surviving workers drained and exited cleanly on SIGTERM
