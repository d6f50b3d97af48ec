"""The specd command line, run as real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration


def specd(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specd", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "SPECD_MODELS__TORCH_THREADS": "1",
                                                **(env or {})})


def model_env(tiny_pair: dict) -> dict:
    return {"SPECD_MODELS__TARGET": tiny_pair["target"], "SPECD_MODELS__DRAFT": tiny_pair["draft"]}


@pytest.mark.parametrize("command", [[], ["demo"], ["verifier"], ["edge"], ["generate"]])
def test_every_command_has_help(command: list[str]) -> None:
    result = specd(*command, "--help")
    assert result.returncode == 0 and "usage: specd" in result.stdout


def test_generate_json_speculative_equals_target_mode(tiny_pair) -> None:
    """Also issue 21, items 8 and 12: every mode runs under one torch thread policy, said in the
    JSON (torch_threads: 1 unless --torch-threads); target/draft say finish_reason, and their
    acceptance is null (nothing was drafted and verified), not 0.0."""
    env = {**model_env(tiny_pair), "SPECD_REDIS__URL": "", "SPECD_MODELS__TORCH_THREADS": "0"}
    args = ["generate", "--prompt", "def add(a, b):", "--max-new-tokens", "20", "--json"]
    spec = specd(*args, "--gamma", "3", env=env)
    assert spec.returncode == 0, spec.stderr
    out = json.loads(spec.stdout)
    for key in ("token_ids", "text", "rounds", "drafted", "accepted", "acceptance_rate",
                "target_forward_passes", "draft_ms", "queue_ms", "verify_ms", "transport_ms"):
        assert key in out
    target = json.loads(specd(*args, "--mode", "target", env=env).stdout)
    assert out["token_ids"] == target["token_ids"] and len(out["token_ids"]) == 20
    assert target["target_forward_passes"] == 20 > out["target_forward_passes"] == out["rounds"]
    draft = json.loads(specd(*args, "--mode", "draft", env=env).stdout)
    assert len(draft["token_ids"]) == 20
    assert out["torch_threads"] == target["torch_threads"] == draft["torch_threads"] == 1
    assert out["finish_reason"] == target["finish_reason"] == draft["finish_reason"] == "length"
    assert target["acceptance_rate"] is None and draft["acceptance_rate"] is None


def test_config_error_names_the_key(tiny_pair) -> None:
    result = specd("generate", "--prompt", "x", env={"SPECD_EDGE__GAMA": "3"})
    assert result.returncode == 2 and "SPECD_EDGE__GAMA" in result.stderr
    result = specd("generate", "--prompt", "x", "--top-p", "2")
    assert result.returncode == 2 and "sampling.top_p" in result.stderr


def test_demo_runs_on_embedded_redis(tiny_pair, tmp_path) -> None:
    env = {**model_env(tiny_pair), "SPECD_REDIS__URL": ""}
    result = specd("demo", "--edges", "2", "--sessions-per-edge", "2", "--max-new-tokens", "16",
                   "--log-dir", str(tmp_path), "--json", env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["sessions"]) == 4
    assert all(r["finish_reason"] == "stop" or r["tokens"] == 16 for r in report["sessions"])
    assert report["total"]["tokens"] == sum(r["tokens"] for r in report["sessions"]) > 0
    for word in ("TOTAL", "accept%", "tok/s", "queue ms", "verify ms", "transp ms"):
        assert word in result.stdout
    verifier_log = [json.loads(line) for line in (tmp_path / "verifier.log").read_text().splitlines()]
    rounds = [e for e in verifier_log if e["event"] == "verify.round"]
    assert rounds and all("session_id" in e and "worker_id" in e for e in rounds)
    assert sum(1 for e in verifier_log if e["event"] == "session.summary") == 4


def test_verifier_and_edge_processes_with_health_and_drain(redis_url, tiny_pair) -> None:
    env = {**os.environ, **model_env(tiny_pair), "SPECD_REDIS__URL": redis_url,
           "SPECD_REDIS__KEY_PREFIX": "cli", "SPECD_MODELS__TORCH_THREADS": "1"}
    verifier = subprocess.Popen([sys.executable, "-m", "specd", "verifier", "--worker-id", "v1",
                                 "--log-format", "json"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while specd("verifier", "--check", "--worker-id", "v1", env=env).returncode != 0:
            assert time.monotonic() < deadline and verifier.poll() is None
            time.sleep(0.5)
        edge = specd("edge", "--prompt", "import os", "--prompt", "class Stack:", "--events",
                     "--max-new-tokens", "12", env=env)
        assert edge.returncode == 0, edge.stderr
        events = [json.loads(line) for line in edge.stdout.splitlines()]
        assert sum(e["event"] == "result" for e in events) == 2
        assert any(e["event"] == "tokens" for e in events)
    finally:
        verifier.send_signal(signal.SIGTERM)
        _, err = verifier.communicate(timeout=60)
    assert verifier.returncode == 0, err
    assert "verifier.stopped" in err
    assert specd("verifier", "--check", "--worker-id", "v1", env=env).returncode == 1
