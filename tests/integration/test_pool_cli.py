"""`specd verifier --workers N` and `specd pool status` as real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration


def test_verifier_workers_and_pool_status(redis_url, tiny_pair) -> None:
    env = {**os.environ, "SPECD_REDIS__URL": redis_url, "SPECD_REDIS__KEY_PREFIX": "pcli",
           "SPECD_MODELS__TARGET": tiny_pair["target"], "SPECD_MODELS__DRAFT": tiny_pair["draft"],
           "SPECD_MODELS__TORCH_THREADS": "1", "SPECD_POOL__LEASE_MS": "1000"}

    def status() -> dict:
        out = subprocess.run([sys.executable, "-m", "specd", "pool", "status", "--json"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    parent = subprocess.Popen([sys.executable, "-m", "specd", "verifier", "--workers", "2",
                               "--worker-id", "pv", "--log-level", "warning"],
                              env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while set(status()["workers"]) != {"pv-0", "pv-1"}:
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.5)
        report = status()
        assert report["sessions"] == 0 and report["deadletter_length"] == 0
        for load in report["workers"].values():
            assert {"sessions", "queue", "kv_bytes", "resident_tokens", "tenants", "load"} <= set(load)
        human = subprocess.run([sys.executable, "-m", "specd", "pool", "status"], env=env,
                               capture_output=True, text=True, timeout=60)
        assert "pv-0" in human.stdout and "live verifier" in human.stdout
    finally:
        parent.send_signal(signal.SIGTERM)
        _, err = parent.communicate(timeout=60)
    assert parent.returncode == 0, err
    assert status()["workers"] == {}  # leaving workers deregister
