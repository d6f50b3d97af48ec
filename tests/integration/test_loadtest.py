"""`specd loadtest` end to end: a verifier process and edge processes against a real Redis."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_loadtest_replay_report_and_charts(tiny_pair, redis_url, tmp_path) -> None:
    report, plots = tmp_path / "report.json", tmp_path / "plots"
    env = {**os.environ, "SPECD_MODELS__TORCH_THREADS": "1", "SPECD_MODELS__TARGET": tiny_pair["target"],
           "SPECD_MODELS__DRAFT": tiny_pair["draft"]}
    result = subprocess.run(
        [sys.executable, "-m", "specd", "loadtest", "--redis-url", redis_url, "--edges", "2",
         "--sessions-per-edge", "2", "--backend", "replay", "--multiplex-verdicts",
         "--network-delay-ms", "2", "--max-new-tokens", "12", "--prompt", "def add(a, b):",
         "--prompt", "import os", "--prompt", "class Stack:", "--report", str(report),
         "--plot", str(plots), "--log-dir", str(tmp_path / "logs"), "--no-progress"],
        capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "tok/s" in result.stdout  # the table
    data = json.loads(report.read_text())
    point = data["summary"]
    assert point["completed_sessions"] == 4 and point["error_count"] == 0
    assert point["tokens"] == 4 * 12 or point["tokens"] > 0
    for key in ("tokens_per_s", "tokens_per_s_per_session", "token_latency_ms", "round_latency_ms",
                "ttft_ms", "acceptance_rate", "mean_accepted_length", "queue_ms", "redis_rtt_ms",
                "broker_overhead_ms", "errors"):
        assert key in point
    for key in ("p50", "p95", "p99"):
        assert key in point["round_latency_ms"]
    verifier = point["verifier"]
    assert verifier["forward_passes"] > 0 and verifier["batch_size_histogram"]
    assert 0 < verifier["forward_passes_per_token"] <= 1
    for name in ("throughput", "latency", "acceptance", "batch_sizes"):
        png = plots / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loadtest_on_its_embedded_redis_masks_the_password(tiny_pair, tmp_path) -> None:
    """Issue 21, item 6: the embedded Redis's URL carries its random password; it is shown as ***."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECD_")}
    env.update(SPECD_MODELS__TORCH_THREADS="1", SPECD_MODELS__TARGET=tiny_pair["target"],
               SPECD_MODELS__DRAFT=tiny_pair["draft"])
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "specd", "loadtest", "--edges", "1", "--sessions-per-edge", "1",
         "--backend", "replay", "--max-new-tokens", "4", "--prompt", "def add(a, b):",
         "--report", str(report), "--log-dir", str(tmp_path / "logs"), "--no-progress"],
        capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "embedded at redis://" in result.stdout and ":***@" in result.stdout, result.stdout
    shown = result.stdout + result.stderr + report.read_text()
    passwords = re.findall(r"redis://[^:/@\s]*:([^@\s]*)@", shown)
    assert passwords and set(passwords) == {"***"}, shown
