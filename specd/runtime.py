"""Wiring for in-process use: build a verifier worker and an edge client from settings."""

from __future__ import annotations

from broker.streams import Broker, connect, connect_settings
from common.models import load_causal_lm, set_torch_threads
from common.settings import Settings
from edge_worker.backends import create_backend
from edge_worker.client import EdgeClient, EdgeConfig
from verifier_worker.engine import TargetEngine
from verifier_worker.worker import VerifierWorker


def make_broker(settings: Settings, url: str | None = None) -> Broker:
    """A broker on the configured Redis (credentials and TLS included), or on ``url`` (embedded)."""
    redis = settings.redis
    client = connect(url, redis.socket_timeout_s) if url and url != redis.url else connect_settings(redis)
    return Broker(client, prefix=redis.key_prefix, maxlen=redis.stream_maxlen,
                  session_ttl_s=redis.session_ttl_s)


def build_verifier(settings: Settings, broker: Broker, worker_id: str = "") -> VerifierWorker:
    models = settings.models
    set_torch_threads(models.torch_threads)
    target = load_causal_lm(models.target, models.dtype, models.target_device, models.trust_remote_code)
    engine = TargetEngine(target.model, target.vocab_size)
    return VerifierWorker(settings, engine, broker, models.target, target.fingerprint, worker_id)


def build_edge(settings: Settings, broker: Broker) -> EdgeClient:
    models, edge = settings.models, settings.edge
    set_torch_threads(models.torch_threads)
    backend = create_backend(edge.backend, models.draft, models.dtype, models.draft_device,
                             models.trust_remote_code)
    config = EdgeConfig(gamma=edge.gamma, max_support=edge.max_support,
                        verdict_timeout_s=edge.verdict_timeout_s, tenant=edge.tenant,
                        target_model=models.target)
    return EdgeClient(backend, broker, config, edge.max_concurrent_sessions)
