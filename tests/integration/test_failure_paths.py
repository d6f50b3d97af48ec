"""Failure paths as a user meets them, run as real processes (issue 15, issue 12 finding 7).

Interrupted and killed commands leave nothing behind; a terminal shows only the generated text;
signals stop workers in every state; children die with their parent.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis as redis_client
from conftest import start_redis_server

pytestmark = pytest.mark.integration

ENV = {"SPECD_MODELS__TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def specd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "specd", *args]


def marked_env(mark: str, tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a command under test; ``mark`` lets us find every process it started."""
    tmp.mkdir(parents=True, exist_ok=True)
    kept = ("SPECD_MODELS__TARGET", "SPECD_MODELS__DRAFT")  # the tiny pair (tests/conftest.py)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECD_") or k in kept}
    return {**env, **ENV, "LEAK_TEST_MARK": mark, "TMPDIR": str(tmp), **extra}


def marked_processes(mark: str) -> list[str]:
    """Command lines of live processes whose environment carries ``mark`` (children inherit it)."""
    found = []
    needle = f"LEAK_TEST_MARK={mark}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                status = (entry / "stat").read_text().split()[2]
                if status != "Z":  # a zombie is dead, only not yet reaped by its parent
                    found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def wait_gone(mark: str, timeout_s: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (left := marked_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_generate_in_a_terminal_shows_only_the_text(tiny_pair, tmp_path) -> None:
    """Through a pseudo-terminal: no log lines, no deprecation warnings inside the streamed text."""
    master, slave = os.openpty()
    env = marked_env(uuid.uuid4().hex, tmp_path, SPECD_MODELS__TARGET=tiny_pair["target"],
                     SPECD_MODELS__DRAFT=tiny_pair["draft"])
    process = subprocess.Popen(specd_command("generate", "--prompt", "def f(x):", "--max-new-tokens", "12"),
                               stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    output = b""
    while select.select([master], [], [], 120)[0]:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    text = output.decode(errors="replace")
    assert process.wait(30) == 0, text
    assert text.startswith("def f(x):"), text
    for noise in ('"event"', "[info", "Warning", "deprecated", "[transformers]"):
        assert noise not in text, text
    assert "mode=speculative" in text  # the figures line (stderr) comes after the text


# Hides the web server's packages, as on the base install that `dev.sh demo` makes (no extras).
BASE_INSTALL = ("import sys; sys.modules.update(fastapi=None, uvicorn=None, starlette=None); "
                "from specd.cli import main; sys.exit(main(sys.argv[1:]))")


def _converse_in_a_terminal(command: list[str], env: dict[str, str], lines: list[str | None],
                            prompt: bytes = b"you> ") -> tuple[int, str]:
    """Run ``command`` on a pseudo-terminal, typing each line when ``prompt`` shows (None: Ctrl-C,
    sent as SIGINT); (rc, output)."""
    master, slave = os.openpty()
    process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    output, typed = b"", 0
    while select.select([master], [], [], 120)[0]:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
        if typed < len(lines) and output.count(prompt) > typed:
            line = lines[typed]
            if line is None:
                process.send_signal(signal.SIGINT)
            else:
                os.write(master, line.encode() + b"\n")
            typed += 1
    os.close(master)
    return process.wait(30), output.decode(errors="replace")


def test_chat_in_a_terminal_on_the_base_install_shows_only_the_answer(tiny_pair, tmp_path) -> None:
    """Issue 21, items 2 and 3: `specd chat` without fastapi (the base install) runs, and on a
    terminal no info log line (verify.round, session.*) lands inside the streamed answer."""
    env = marked_env(uuid.uuid4().hex, tmp_path, SPECD_MODELS__TARGET=tiny_pair["target"],
                     SPECD_MODELS__DRAFT=tiny_pair["draft"], SPECD_SAMPLING__MAX_NEW_TOKENS="12")
    rc, text = _converse_in_a_terminal([sys.executable, "-c", BASE_INSTALL, "chat"], env,
                                       ["def add", "/quit"])
    assert rc == 0, text
    assert "ModuleNotFoundError" not in text and "internal error" not in text, text
    answer = text.split("specd> ", 1)[1]
    assert "tok/s" in answer and "acceptance" in answer, text  # the turn's figures line
    for noise in ('"event"', "[info", "verify.round", "session.", "Warning", "deprecated"):
        assert noise not in text, text


def test_chat_left_with_ctrl_c_at_the_prompt_exits_130(tiny_pair, tmp_path) -> None:
    """Issue 21, item 12: Ctrl-C at chat's prompt leaves, as an interruption (130, the table)."""
    env = marked_env(uuid.uuid4().hex, tmp_path, SPECD_MODELS__TARGET=tiny_pair["target"],
                     SPECD_MODELS__DRAFT=tiny_pair["draft"], SPECD_SAMPLING__MAX_NEW_TOKENS="4")
    rc, text = _converse_in_a_terminal(specd_command("chat"), env, ["def add", None])
    assert rc == 130, text
    assert "Traceback" not in text, text


def test_verifier_exits_130_on_ctrl_c(redis_url, tiny_pair, tmp_path) -> None:
    """Issue 21, item 12: `specd verifier` on SIGINT drains and exits 130 (interrupted, the exit-code
    table); `--workers N` returns its children's worst code, so 130 too. SIGTERM, an orderly stop,
    stays 0 (test_cli, test_pool_failover)."""
    env = marked_env(uuid.uuid4().hex, tmp_path, SPECD_MODELS__TARGET=tiny_pair["target"],
                     SPECD_REDIS__URL=redis_url, SPECD_REDIS__KEY_PREFIX="ki",
                     SPECD_POOL__KV_BUDGET_TOKENS="4096")
    client = redis_client.Redis.from_url(redis_url)
    log = tmp_path / "verifiers.log"
    with open(log, "wb") as err:
        parent = subprocess.Popen(specd_command("verifier", "--worker-id", "ki-0"),
                                  env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 240
        while not client.exists("ki:health:verifier:ki-0"):
            assert time.monotonic() < deadline and parent.poll() is None  # serving
            time.sleep(0.2)
        parent.send_signal(signal.SIGINT)
        parent.wait(60)
    finally:
        client.close()
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == 130, log.read_text()[-2000:]
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("command", [["edge", "--prompt", "x"], ["generate", "--prompt", "x"]])
def test_no_live_verifier_fails_fast_with_one_clear_line(redis_url, tiny_pair, monkeypatch, capsys,
                                                         command) -> None:
    """Issue 21, item 10: edge and generate check the verifier heartbeat up front, as serve does,
    instead of 60 s of re-sends and `[] error internal: internal: ...`."""
    from specd import cli

    monkeypatch.setenv("SPECD_REDIS__STARTUP_WAIT_S", "0.5")
    monkeypatch.setenv("SPECD_MODELS__DRAFT", tiny_pair["draft"])
    prefix = f"nov{uuid.uuid4().hex[:8]}"  # no verifier heartbeats under it
    monkeypatch.setenv("SPECD_REDIS__KEY_PREFIX", prefix)
    started = time.monotonic()
    assert cli.main([*command, "--redis-url", redis_url]) == 1
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"specd {command[0]}: no verifier is alive at {redis_url}"), err
    assert "`specd verifier`" in err and len(err.splitlines()) == 1 and "internal" not in err, err


def test_pool_status_into_a_closed_pipe_is_quiet(redis_url, tmp_path) -> None:
    """Issue 21, item 12: `specd pool status --json | head` ended in a BrokenPipeError traceback."""
    env = marked_env(uuid.uuid4().hex, tmp_path, SPECD_REDIS__URL=redis_url)
    process = subprocess.Popen(specd_command("pool", "status", "--json"), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    process.stdout.close()  # the reader is gone before the first line is written
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "BrokenPipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err


def _run_one(index: int, mark: str, tmp: Path, pair: dict[str, str], rng: random.Random) -> tuple[str, int]:
    env = marked_env(mark, tmp, SPECD_MODELS__TARGET=pair["target"], SPECD_MODELS__DRAFT=pair["draft"],
                     SPECD_POOL__KV_BUDGET_TOKENS="4096")
    process = subprocess.Popen(
        specd_command("generate", "--prompt", f"def f{index}(x):", "--max-new-tokens", "6", "--json"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    kind = "run"
    if index % 2:  # half of them: a signal at a random moment of their life (start-up included)
        sig = signal.SIGINT if index % 4 == 1 else signal.SIGKILL
        kind = sig.name
        try:
            process.wait(rng.uniform(0.2, 5.0))
        except subprocess.TimeoutExpired:
            process.send_signal(sig)
    _, err = process.communicate(timeout=400)
    if kind == "run":
        assert process.returncode == 0, err.decode()[-2000:]
    if kind == "SIGINT":  # interrupted (130), or done before the signal came (0)
        assert process.returncode in (0, 130, -signal.SIGINT), err.decode()[-2000:]
        assert b"Traceback" not in err, err.decode()[-2000:]
    return kind, process.returncode


@pytest.mark.timeout(900)  # ~70 s on a quiet 2-core machine; 30 model-loading processes
def test_thirty_generates_half_interrupted_leave_nothing_behind(tiny_pair, tmp_path) -> None:
    """30 `specd generate` (embedded Redis), half killed with SIGINT or SIGKILL at random moments:
    no redis-server, verifier or edge process and no temp folder is left."""
    mark, tmp = uuid.uuid4().hex, tmp_path / "tmp"
    delays = [random.Random(i) for i in range(30)]
    started = time.monotonic()
    with ThreadPoolExecutor(3) as pool:  # 2 cores: a few at a time
        outcomes = list(pool.map(lambda i: _run_one(i, mark, tmp, tiny_pair, delays[i]), range(30)))
    print(f"30 generates in {time.monotonic() - started:.0f} s: {outcomes}")
    assert sum(kind != "run" for kind, _ in outcomes) == 15
    left = wait_gone(mark)
    assert left == [], left
    assert sorted(p.name for p in tmp.iterdir()) == [], "temp entries left behind"


def test_killing_the_workers_parent_stops_its_children(redis_url, tiny_pair, tmp_path) -> None:
    """`specd verifier --workers 2`: SIGKILL of the parent, and both verifiers exit (issue 12, 7)."""
    mark = uuid.uuid4().hex
    env = marked_env(mark, tmp_path, SPECD_MODELS__TARGET=tiny_pair["target"], SPECD_REDIS__URL=redis_url,
                     SPECD_REDIS__KEY_PREFIX="kw", SPECD_POOL__KV_BUDGET_TOKENS="4096")
    parent = subprocess.Popen(specd_command("verifier", "--workers", "2", "--worker-id", "kw"), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis_client.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 120
        while not (client.exists("kw:health:verifier:kw-0") and client.exists("kw:health:verifier:kw-1")):
            assert time.monotonic() < deadline and parent.poll() is None  # both serving
            time.sleep(0.2)
        assert len(marked_processes(mark)) >= 3
        parent.kill()
        parent.wait(10)
        left = wait_gone(mark, timeout_s=45)  # SIGTERM: each child drains (nothing to drain) and exits
        assert left == [], left
        assert not client.exists("kw:health:verifier:kw-0", "kw:health:verifier:kw-1")  # a clean stop
    finally:
        client.close()
        if parent.poll() is None:
            parent.kill()


def test_verifier_stops_on_sigterm_while_redis_is_gone(tiny_pair, tmp_path) -> None:
    """Redis dies under a running verifier; SIGTERM still ends it within seconds, not never."""
    redis, port = start_redis_server(tmp_path)
    mark = uuid.uuid4().hex
    env = marked_env(mark, tmp_path / "t", SPECD_MODELS__TARGET=tiny_pair["target"],
                     SPECD_REDIS__URL=f"redis://127.0.0.1:{port}/0", SPECD_POOL__KV_BUDGET_TOKENS="4096",
                     SPECD_VERIFIER__DRAIN_TIMEOUT_S="2", SPECD_REDIS__SOCKET_TIMEOUT_S="2")
    verifier = subprocess.Popen(specd_command("verifier", "--worker-id", "gone"), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = redis_client.Redis(port=port)
        deadline = time.monotonic() + 120
        while not client.exists("specd:health:verifier:gone"):
            assert time.monotonic() < deadline and verifier.poll() is None
            time.sleep(0.2)
        client.close()
        redis.kill()
        redis.wait(10)
        time.sleep(1.0)  # the verifier is now retrying its reads
        started = time.monotonic()
        verifier.send_signal(signal.SIGTERM)
        verifier.wait(30)
        assert time.monotonic() - started < 15  # drain (2 s) + grace (5 s), with room for a busy CPU
    finally:
        if verifier.poll() is None:
            verifier.kill()
        if redis.poll() is None:
            redis.kill()
    assert verifier.returncode in (0, 130)
    assert "Traceback" not in verifier.stderr.read() if verifier.stderr else True


def test_verifier_stops_on_sigterm_while_redis_is_unreachable(tmp_path) -> None:
    """At start-up against a refused URL: SIGTERM ends the bounded wait at once (exit 130)."""
    env = marked_env(uuid.uuid4().hex, tmp_path, SPECD_REDIS__URL="redis://127.0.0.1:1/0",
                     SPECD_REDIS__STARTUP_WAIT_S="120")
    verifier = subprocess.Popen(specd_command("verifier"), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    time.sleep(3.0)
    verifier.send_signal(signal.SIGTERM)
    _, err = verifier.communicate(timeout=10)
    assert verifier.returncode == 130 and "Traceback" not in err, err


async def test_edge_serves_its_other_prompts_after_the_verifier_rejects_one(redis_url, tiny_pair) -> None:
    """An edge that cannot check the context itself (replay backend: context unknown) sends an
    over-long prompt; the verifier rejects it with a typed error, the edge reports it and serves the
    rest (it used to crash)."""
    import dataclasses

    from local_pool import local_pool

    from common.settings import Settings
    from specd.workers import PromptJob, run_edge_jobs

    settings = Settings(redis={"url": redis_url, "key_prefix": "rej"}, pool={"kv_budget_tokens": 4096},
                        models={"target": tiny_pair["target"], "draft": tiny_pair["draft"]},
                        sampling={"max_new_tokens": 8}, verifier={"idle_block_ms": 5})
    async with local_pool(settings) as (_verifier, edge):
        edge.config = dataclasses.replace(edge.config, max_context=0)
        events: list[dict] = []
        results = await run_edge_jobs(settings, edge, [PromptJob("x " * 600), PromptJob("def f(x):")],
                                      events.append)
    errors = [e for e in events if e["event"] == "error"]
    assert results[0] is None and results[1] is not None and len(results[1].token_ids) == 8
    assert len(errors) == 1 and errors[0]["code"] == "limit_exceeded"
    assert "the target model has 512" in errors[0]["message"]
