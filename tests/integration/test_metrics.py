"""Prometheus endpoints of a verifier and an edge, scraped and parsed while they run."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.metrics import EdgeMetrics, VerifierMetrics
from common.settings import Settings
from common.wire import SamplingSpec
from specd.runtime import build_edge, build_verifier, make_broker
from specd.workers import worker_services

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[str, float]:
    """Every sample of http://127.0.0.1:port/metrics, keyed ``name{label=value,...}``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def total(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(name + "{"))


async def test_scrape_during_a_run_shows_rounds_and_accepted_tokens(redis_url, tiny_pair) -> None:
    from conftest import _free_port

    verifier_port, edge_port = _free_port(), _free_port()
    base = {"redis": {"url": redis_url, "key_prefix": "met"},
            "models": {"target": tiny_pair["target"], "draft": tiny_pair["draft"]},
            "verifier": {"idle_block_ms": 20}, "edge": {"tenant": "acme"}}
    verifier_settings = Settings(**base, metrics={"port": verifier_port, "host": "127.0.0.1"})
    edge_settings = Settings(**base, metrics={"port": edge_port, "host": "127.0.0.1"})
    verifier_broker, edge_broker = make_broker(verifier_settings), make_broker(edge_settings)
    verifier = build_verifier(verifier_settings, verifier_broker, worker_id="v-met")
    edge = build_edge(edge_settings, edge_broker)
    stop = asyncio.Event()
    async with worker_services(verifier_settings, verifier_broker, verifier.metrics.registry), \
            worker_services(edge_settings, edge_broker, edge.metrics.registry):
        task = asyncio.create_task(verifier.run(stop))
        try:
            await edge_broker.open_session("junk", b"\xc1 not msgpack")
            ids = edge.backend.tokenizer.encode
            await asyncio.gather(*(edge.generate(ids(p), SamplingSpec(max_new_tokens=16))
                                   for p in ("import os", "class Stack:", "def f(x):")))
            scraped = await asyncio.to_thread(scrape, verifier_port)
            edge_scraped = await asyncio.to_thread(scrape, edge_port)
        finally:
            stop.set()
            await task
    await verifier_broker.close()
    await edge_broker.close()

    rounds = scraped["specd_verifier_rounds_total{tenant=acme}"]
    assert rounds > 0 and scraped["specd_verifier_accepted_tokens_total{tenant=acme}"] > 0
    assert scraped["specd_verifier_drafted_tokens_total{tenant=acme}"] >= \
        scraped["specd_verifier_accepted_tokens_total{tenant=acme}"]
    assert scraped["specd_verifier_sessions_opened_total{tenant=acme}"] == 3
    assert scraped["specd_verifier_sessions{tenant=acme}"] == 0
    assert scraped["specd_verifier_accepted_length_tokens_count{tenant=acme}"] == rounds
    passes = scraped["specd_verifier_forward_passes_total{}"]
    assert scraped["specd_verifier_verify_seconds_count{}"] == passes > 0
    assert scraped["specd_verifier_errors_total{code=malformed}"] == 1
    assert total(scraped, "specd_verifier_batch_sessions_bucket") > 0
    assert "specd_verifier_kv_cache_bytes{}" in scraped and "specd_verifier_queue_depth_drafts{}" in scraped
    assert edge_scraped["specd_edge_rounds_total{tenant=acme}"] == rounds
    assert edge_scraped["specd_edge_accepted_tokens_total{tenant=acme}"] == \
        scraped["specd_verifier_accepted_tokens_total{tenant=acme}"]
    assert edge_scraped["specd_edge_round_seconds_count{tenant=acme}"] == rounds
    assert edge_scraped["specd_edge_sessions_finished_total{outcome=length,tenant=acme}"] + \
        edge_scraped.get("specd_edge_sessions_finished_total{outcome=stop,tenant=acme}", 0) == 3


def test_each_worker_object_has_its_own_registry() -> None:
    first, second = VerifierMetrics(), VerifierMetrics()
    first.observe_round("t", 4, 3, 1.0)
    assert second.registry.get_sample_value("specd_verifier_rounds_total", {"tenant": "t"}) is None
    assert first.registry.get_sample_value("specd_verifier_rounds_total", {"tenant": "t"}) == 1
    EdgeMetrics(), EdgeMetrics()  # no duplicate-registration error: nothing is global
