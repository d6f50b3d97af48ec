"""Faults with a real redis-server and real worker processes.

One verifier process serves the module (session TTL 5 s, verdict timeout 10 s, log lines also
sent to the Redis log stream, metrics on a port). In turn: the verifier is frozen (SIGSTOP) for
a few seconds mid-run; an edge is killed mid-session; Redis is killed and restarted empty
mid-run. Nothing may hang, nothing well-formed may be lost or come out wrong.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from common.models import load_causal_lm
from common.sampling import SamplingParams
from common.settings import Settings
from specd.workers import check_health
from verifier_worker.engine import TargetEngine, generate_target_only

pytestmark = pytest.mark.integration
PREFIX = "flt"
PROMPTS = ["def add(a, b):", "import os", "class Stack:"]


class RedisServer:
    """A redis-server on a fixed port that the test can kill and start again (empty)."""

    def __init__(self, workdir: Path) -> None:
        from conftest import _free_port

        self.workdir, self.port = workdir, _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        from conftest import _wait_for_port, redis_server_binary

        self.process = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(self.port)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)


class Worker:
    """A specd process; its stdout JSON events are collected by a thread, stderr goes to a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        with open(log, "ab") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "specd", *args], env=env,
                                            stdout=subprocess.PIPE, stderr=err, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self.events.put(json.loads(line))
            except json.JSONDecodeError:
                continue

    def wait_event(self, kind: str, timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=0.5)
            except queue.Empty:
                assert self.process.poll() is None, f"exited early: {self.log.read_text()[-2000:]}"
                continue
            self.seen.append(event)
            if event["event"] == kind:
                return event
        raise AssertionError(f"no {kind} event within {timeout}s")

    def finish(self, timeout: float = 180) -> list[dict[str, Any]]:
        """Wait for the exit (a hang fails the test) and return every event it printed."""
        self.process.wait(timeout=timeout)
        time.sleep(0.2)
        while not self.events.empty():
            self.seen.append(self.events.get())
        return self.seen


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_pair) -> Iterator[dict[str, Any]]:
    from conftest import _free_port

    folder = tmp_path_factory.mktemp("faults")
    server = RedisServer(folder)
    server.start()
    metrics_port = _free_port()
    variables = {**os.environ, "SPECD_REDIS__URL": server.url, "SPECD_REDIS__KEY_PREFIX": PREFIX,
                 "SPECD_REDIS__SESSION_TTL_S": "5", "SPECD_MODELS__TARGET": tiny_pair["target"],
                 "SPECD_MODELS__DRAFT": tiny_pair["draft"], "SPECD_MODELS__TORCH_THREADS": "1",
                 "SPECD_EDGE__VERDICT_TIMEOUT_S": "10", "SPECD_LOG__FORMAT": "json",
                 "SPECD_LOG__REDIS_STREAM": "true", "SPECD_VERIFIER__HEARTBEAT_TTL_S": "3",
                 "SPECD_VERIFIER__IDLE_BLOCK_MS": "50"}
    verifier = Worker(["verifier", "--worker-id", "vf", "--metrics-port", str(metrics_port)], variables,
                      folder / "verifier.log")
    client = redis.Redis.from_url(server.url)
    deadline = time.monotonic() + 180
    while not client.exists(f"{PREFIX}:health:verifier:vf"):
        assert time.monotonic() < deadline and verifier.process.poll() is None, \
            (folder / "verifier.log").read_text()[-3000:]
        time.sleep(0.3)
    try:
        yield {"vars": variables, "server": server, "verifier": verifier, "folder": folder,
               "metrics_port": metrics_port}
    finally:
        verifier.process.terminate()
        verifier.process.wait(timeout=60)
        if server.process is not None and server.process.poll() is None:
            server.kill()


@pytest.fixture(scope="module")
def reference(tiny_pair):
    target = load_causal_lm(tiny_pair["target"])
    engine = TargetEngine(target.model, target.vocab_size)

    def greedy(prompt: str, n: int) -> list[int]:
        return generate_target_only(engine, target.tokenizer.encode(prompt), SamplingParams(),
                                    target.eos_token_ids, n)

    return greedy


def edge(env: dict[str, Any], name: str, prompts: list[str], max_new_tokens: int) -> Worker:
    args = ["edge", "--worker-id", name, "--events", "--max-new-tokens", str(max_new_tokens)]
    return Worker([*args, *(a for p in prompts for a in ("--prompt", p))], env["vars"],
                  env["folder"] / f"{name}.log")


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        families = text_string_to_metric_families(reply.read().decode())
    return {s.name + json.dumps(s.labels, sort_keys=True): s.value for f in families for s in f.samples}


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(name + "{")
               and all(json.loads(k[len(name):]).get(a) == b for a, b in labels.items()))


def specd_logs(*args: str, env: dict[str, Any], capsys: Any, monkeypatch: Any) -> list[dict[str, Any]]:
    """`specd logs ARGS --json`, run in this process (the CLI's own code path, minus a startup)."""
    from specd.cli import main

    monkeypatch.setattr("specd.cli.configure_logging", lambda *a, **k: None)  # keep pytest's streams
    monkeypatch.setenv("SPECD_REDIS__URL", env["server"].url)
    monkeypatch.setenv("SPECD_REDIS__KEY_PREFIX", PREFIX)
    capsys.readouterr()
    assert main(["logs", *args, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_slow_verifier_edges_wait_and_nothing_is_lost(env, reference, capsys, monkeypatch) -> None:
    worker = edge(env, "e-slow", PROMPTS, 24)
    worker.wait_event("tokens")
    verifier = env["verifier"].process
    os.kill(verifier.pid, signal.SIGSTOP)  # a verifier that stops answering for a while
    time.sleep(3)
    os.kill(verifier.pid, signal.SIGCONT)
    events = worker.finish()
    results = [e for e in events if e["event"] == "result"]
    assert worker.process.returncode == 0 and len(results) == 3, events[-3:]
    for result in results:
        assert result["token_ids"] == reference(result["prompt"], 24)

    # The session's timeline from the worker log files, and its lines in the Redis log stream.
    sid = results[0]["session_id"]
    files = ["--file", str(env["folder"] / "verifier.log"), "--file", str(worker.log)]
    short = sid[:sid.index(".") + 9]  # a unique prefix: the tenant and 8 random hex digits
    timeline = specd_logs("session", short, *files, env=env, capsys=capsys, monkeypatch=monkeypatch)
    summary = timeline[-1]
    assert summary["event"] == "timeline.summary" and summary["complete"]
    assert summary["rounds"] == results[0]["rounds"] and summary["accepted"] == results[0]["accepted"]
    recovery = {"edge.resend", "session.lease_retaken", "draft.duplicate"}  # the stall's traces
    events_seen = [e["event"] for e in timeline if e["event"] not in recovery]
    assert events_seen[:2] == ["session.opened", "verify.round"]
    assert timeline[-2]["event"] in ("edge.session.summary", "session.summary")
    time.sleep(1)  # the drain task flushes every 0.2 s
    streamed = specd_logs("--session", sid, env=env, capsys=capsys, monkeypatch=monkeypatch)
    assert {"session.opened", "verify.round", "edge.session.summary"} <= {e["event"] for e in streamed}

    samples = scrape(env["metrics_port"])
    assert metric(samples, "specd_verifier_rounds_total") > 0
    assert metric(samples, "specd_verifier_accepted_tokens_total") > 0
    assert edge_healthy(env, "e-slow") == 1  # a cleanly stopped edge removes its heartbeat


def edge_healthy(env: dict[str, Any], worker_id: str) -> int:
    """What `specd edge --check --worker-id ID` exits with (same function, in this process)."""
    settings = Settings(redis={"url": env["server"].url, "key_prefix": PREFIX}, edge={"worker_id": worker_id})
    return asyncio.run(check_health(settings, "edge"))


def test_killed_edge_session_expires_and_frees_its_kv(env) -> None:
    worker = edge(env, "e-kill", ["def fibonacci(n):"], 400)
    sid = worker.wait_event("tokens")["session_id"]
    os.kill(worker.process.pid, signal.SIGSTOP)  # frozen mid-session: its heartbeat still stands
    assert edge_healthy(env, "e-kill") == 0
    worker.process.kill()  # no close message: the verifier must notice on its own
    worker.process.wait(timeout=10)
    client = redis.Redis.from_url(env["server"].url)
    deadline = time.monotonic() + 60
    while True:
        samples = scrape(env["metrics_port"])
        expired = metric(samples, "specd_verifier_sessions_finished_total", reason="expired")
        if expired >= 1 and metric(samples, "specd_verifier_kv_cache_bytes") == 0:
            break
        assert time.monotonic() < deadline, "the abandoned session was never expired"
        time.sleep(0.5)
    assert metric(samples, "specd_verifier_sessions") == 0
    assert not client.exists(*(f"{PREFIX}:{{{sid}}}:{name}" for name in ("drafts", "tokens", "meta")))
    assert client.hgetall(f"{PREFIX}:{{{sid}}}:state") == {b"finished": b"expired"}  # a tombstone, with a TTL
    log = [json.loads(line) for line in (env["folder"] / "verifier.log").read_text().splitlines()
           if line.startswith("{")]
    assert any(e["event"] == "session.expired" and e.get("session_id") == sid for e in log)


def test_redis_restart_mid_run_resumes_or_fails_clearly(env, reference) -> None:
    worker = edge(env, "e-restart", PROMPTS, 48)
    worker.wait_event("tokens")
    env["server"].kill()  # Redis dies, and comes back empty (no persistence)
    time.sleep(1)
    env["server"].start()
    started = time.monotonic()
    events = worker.finish(timeout=120)  # a hang fails here
    waited = time.monotonic() - started
    results = [e for e in events if e["event"] == "result"]
    errors = [e for e in events if e["event"] == "error"]
    assert len(results) + len(errors) == 3, events[-5:]
    for result in results:  # whatever resumed is exactly right
        assert result["token_ids"] == reference(result["prompt"], 48)
    for error in errors:  # whatever did not ends with a typed, readable error
        assert error["code"] and ("no verdict" in error["message"] or error["code"] != "internal")
    print(f"redis restart: {len(results)} sessions resumed, {len(errors)} failed clearly "
          f"({[e['message'] for e in errors]}), edge exited {waited:.1f}s after the restart")

    verifier = env["verifier"]
    assert verifier.process.poll() is None, "the verifier died with Redis"
    client = redis.Redis.from_url(env["server"].url)
    deadline = time.monotonic() + 30
    while not client.exists(f"{PREFIX}:health:verifier:vf"):  # the heartbeat comes back
        assert time.monotonic() < deadline
        time.sleep(0.3)
    if not results:  # nothing resumed: show that the pool serves new sessions after the restart
        after = edge(env, "e-after", ["for i in range(10):"], 16).finish()
        [result] = [e for e in after if e["event"] == "result"]
        assert result["token_ids"] == reference("for i in range(10):", 16)


async def test_edge_fails_clearly_when_redis_stays_unreachable(tiny_pair) -> None:
    """Reads that keep failing (Redis gone for good) end the session at the verdict timeout."""
    import fakeredis
    from redis.exceptions import ConnectionError as RedisConnectionError

    from broker.streams import Broker
    from common.wire import ErrorCode, SamplingSpec
    from edge_worker.client import SessionFailed
    from specd.runtime import build_edge

    broker = Broker(fakeredis.FakeAsyncRedis(), prefix=PREFIX)
    settings = Settings(models={"target": tiny_pair["target"], "draft": tiny_pair["draft"]},
                        edge={"verdict_timeout_s": 1.5})
    client = build_edge(settings, broker)

    async def unreachable(*_args: Any, **_kwargs: Any) -> list[Any]:
        raise RedisConnectionError("Error 111 connecting: Connection refused")

    broker.read_verdicts = unreachable  # type: ignore[method-assign]
    with pytest.raises(SessionFailed, match="no verdict for seq 0") as info:
        await client.generate([1, 2, 3], SamplingSpec(max_new_tokens=4))
    assert info.value.code is ErrorCode.INTERNAL
    assert metric_value(client.metrics.registry, "specd_edge_errors_total", code="internal") == 1
    await broker.close()


def metric_value(registry: Any, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)
