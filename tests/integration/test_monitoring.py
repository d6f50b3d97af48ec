"""The pool's Prometheus rules and Grafana dashboard against a real Prometheus scraping a real pool.

A verifier and an edge (in this process, each with its /metrics endpoint) serve a short load on a
real Redis: sessions of two tenants, one held at a draft-token rate (throttling), and one junk
message (a typed error). Debian's `prometheus` scrapes both every second and evaluates
deploy/prometheus/rules.yml every second. Then every recording rule, every alert expression (its
comparisons made ``bool``, so it answers 0/1 wherever the series it compares exist) and every
dashboard query must return data through Prometheus' HTTP API.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.settings import Settings
from common.wire import SamplingSpec
from specd.runtime import build_edge, build_verifier, make_broker
from specd.workers import worker_services

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "specd.json"
COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(?!\s*bool)")


def rule_queries() -> dict[str, str]:
    """Recording rules by their recorded name; alerts' expressions with ``bool`` comparisons."""
    queries = {}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                queries[rule["record"]] = rule["record"]
            else:
                queries[f"alert {rule['alert']}"] = COMPARISON.sub(r"\1 bool", rule["expr"])
    return queries


def dashboard_queries() -> dict[str, str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {f"panel {p['title']} {t['refId']}": t["expr"] for p in panels for t in p["targets"]}


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Any]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (bash scripts/dev.sh test installs Debian's package)")
    from conftest import _free_port, _wait_for_port

    port = _free_port()
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"  # a short run: evaluate every second
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))

    def start(targets: dict[str, int]) -> str:
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": ["rules.yml"],
                  "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{p}"]}]}
                                     for job, p in targets.items()]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = (tmp_path / "prometheus.log").open("wb")
        opened.append(log)
        processes.append(subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=log))
        _wait_for_port(port, timeout=30)
        return f"http://127.0.0.1:{port}"

    processes: list[subprocess.Popen[bytes]] = []
    opened: list[Any] = []
    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=30)
    for log in opened:
        log.close()


def query(base: str, expr: str) -> list[Any]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_for_data(base: str, queries: dict[str, str], deadline_s: float) -> dict[str, str]:
    """Query until each returns a sample (rates need two scrapes); the ones still empty at the end."""
    missing = dict(queries)
    deadline = time.monotonic() + deadline_s
    while missing and time.monotonic() < deadline:
        missing = {name: expr for name, expr in missing.items() if not query(base, expr)}
        if missing:
            time.sleep(1.0)  # Prometheus' own scrape and evaluation period: there is no event to wait on
    return missing


async def test_every_rule_alert_and_panel_returns_data_from_a_real_pool(redis_url, tiny_pair,
                                                                        prometheus) -> None:
    from conftest import _free_port

    verifier_port, edge_port = _free_port(), _free_port()
    base = {"redis": {"url": redis_url, "key_prefix": "mon"},
            "models": {"target": tiny_pair["target"], "draft": tiny_pair["draft"], "torch_threads": 1},
            "verifier": {"idle_block_ms": 20},
            "tenants": {"overrides": {"slow": {"draft_tokens_per_s": 40.0}}}}
    verifier_settings = Settings(**base, metrics={"port": verifier_port})
    edge_settings = Settings(**base, metrics={"port": edge_port})
    verifier_broker, edge_broker = make_broker(verifier_settings), make_broker(edge_settings)
    verifier = build_verifier(verifier_settings, verifier_broker, worker_id="v-mon")
    edge = build_edge(edge_settings, edge_broker)
    server = prometheus({"specd-verifier": verifier_port, "specd-edge": edge_port})
    queries = {**rule_queries(), **dashboard_queries()}
    stop = asyncio.Event()
    async with worker_services(verifier_settings, verifier_broker, verifier.metrics.registry), \
            worker_services(edge_settings, edge_broker, edge.metrics.registry):
        task = asyncio.create_task(verifier.run(stop))
        try:
            await edge_broker.open_session("junk", b"\xc1 not msgpack")  # one typed error
            ids = edge.backend.tokenizer.encode
            spec = SamplingSpec(max_new_tokens=24)
            for _wave in range(3):  # traffic across several scrapes, so rates have two samples
                await asyncio.gather(
                    *(edge.generate(ids(p), spec) for p in ("import os", "class Stack:")),
                    *(edge.for_tenant("slow").generate(ids(p), spec) for p in ("def f(x):", "for i in")))
            missing = await asyncio.to_thread(wait_for_data, server, queries, 60.0)
        finally:
            stop.set()
            await task
    await verifier_broker.close()
    await edge_broker.close()
    assert missing == {}, f"no data from Prometheus for: {missing}"
    assert len(queries) >= 30
