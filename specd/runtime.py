"""Wiring for in-process use: build a verifier worker and an edge client from settings."""

from __future__ import annotations

from broker.shaping import ShapedBroker
from broker.streams import Broker, connect, connect_settings
from common.models import load_causal_lm, set_torch_threads
from common.settings import Settings
from edge_worker.backends import DraftBackend, create_backend
from edge_worker.client import EdgeClient, EdgeConfig
from edge_worker.verdicts import MultiplexedBroker
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
    engine = TargetEngine(target.model, target.vocab_size, settings.pool.kv_budget_tokens)
    return VerifierWorker(settings, engine, broker, models.target, target.fingerprint, worker_id)


def build_draft_backend(settings: Settings) -> DraftBackend:
    """The configured draft backend on the configured device (or its fallback: see devices)."""
    models, edge = settings.models, settings.edge
    set_torch_threads(models.torch_threads)
    return create_backend(edge.backend, models.draft, models.dtype, edge.device,
                          fallback=edge.device_fallback, precision=edge.precision,
                          cache_dir=edge.cache_dir, trust_remote_code=models.trust_remote_code,
                          threads=models.torch_threads, replay_file=edge.replay_file,
                          replay_acceptance=edge.replay_acceptance,
                          lookup_ngram=(edge.lookup_min_ngram, edge.lookup_max_ngram),
                          lookup_with_model=edge.lookup_with_model,
                          drafts=[d.model_dump() for d in edge.drafts])


def edge_config(settings: Settings) -> EdgeConfig:
    edge = settings.edge
    return EdgeConfig(gamma=edge.gamma, max_support=edge.max_support,
                      verdict_timeout_s=edge.verdict_timeout_s, tenant=edge.tenant,
                      target_model=settings.models.target, adaptive_gamma=edge.adaptive_gamma,
                      gamma_min=edge.gamma_min, gamma_max=edge.gamma_max, draft_ahead=edge.draft_ahead,
                      resend_after_s=edge.resend_after_s, verdict_secret=settings.redis.verdict_secret)


def edge_broker(settings: Settings, broker: Broker) -> Broker:
    """The edge's view of the broker: multiplexed verdict reads and network shaping when set."""
    edge = settings.edge
    if edge.multiplex_verdicts:
        broker = MultiplexedBroker(broker, tenant=edge.tenant)
    if edge.network_delay_ms or edge.network_jitter_ms:
        broker = ShapedBroker(broker, edge.network_delay_ms, edge.network_jitter_ms)
    return broker


def build_edge(settings: Settings, broker: Broker) -> EdgeClient:
    backend = build_draft_backend(settings)
    return EdgeClient(backend, edge_broker(settings, broker), edge_config(settings),
                      settings.edge.max_concurrent_sessions)
