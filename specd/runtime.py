"""Wiring for in-process use: build a verifier worker and an edge client from settings."""

from __future__ import annotations

from typing import Any

from broker.multiplex import MultiplexedBroker
from broker.reach import ensure_reachable
from broker.streams import Broker, make_broker
from common.integrity import NO_SECRET_RISK
from common.logs import get_logger
from common.models import (
    ModelLoadError,
    hub_options,
    load_causal_lm,
    recommended_draft_confidence,
    recommended_gamma,
    resolve_model_path,
    set_torch_threads,
)
from common.settings import (
    DEFAULT_GAMMA,
    ConfigError,
    Settings,
    check_fits_model,
    check_kv_budget,
    context_length,
)
from edge_worker.backends import DraftBackend, build_drafter
from edge_worker.client import EdgeClient, EdgeConfig
from edge_worker.shaping import ShapedBroker
from verifier_worker.engine import TargetEngine
from verifier_worker.worker import VerifierWorker

log = get_logger("specd.runtime")


def check_models(settings: Settings, target: bool, draft: bool) -> None:
    """Model names that cannot load (a missing folder, one without config.json, a hub id neither
    the hub nor the local cache can serve) fail now, before a slow load of the other model:
    ModelLoadError, exit 2."""
    cache = settings.edge.cache_dir  # a GGUF file or named model resolves to its dequantised copy
    if target:
        hub_options(resolve_model_path(settings.models.target, cache))
    if draft and settings.edge.backend != "router":  # the router's drafts name their own models
        hub_options(resolve_model_path(settings.models.draft, cache))


async def open_broker(settings: Settings, url: str | None = None) -> Broker:
    """``make_broker``, once Redis answers (bounded by redis.startup_wait_s; else RedisUnavailable)."""
    broker = make_broker(settings, url)
    try:
        await ensure_reachable(broker.redis, url or settings.redis.url, settings.redis.startup_wait_s)
    except BaseException:
        await broker.close()
        raise
    return broker


def build_verifier(settings: Settings, broker: Broker, worker_id: str = "") -> VerifierWorker:
    models = settings.models
    set_torch_threads(models.torch_threads)
    target = load_causal_lm(models.target, models.dtype, models.target_device, models.trust_remote_code,
                            cache_dir=settings.edge.cache_dir)
    engine = target_engine(target.model, target.vocab_size, settings.pool.kv_budget_tokens)
    engine.warm_up(gamma=draft_gamma(settings))  # the first user's rounds run at warm speed
    return VerifierWorker(settings, engine, broker, models.target, target.fingerprint, worker_id)


def target_engine(model: Any, vocab_size: int, budget_tokens: int) -> TargetEngine:
    """The engine, once its KV arena is known to fit: a too large budget names its setting."""
    import torch

    from verifier_worker.engine import arena_shape

    shape = arena_shape(model.config)
    parameter = next(model.parameters())
    per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * parameter.element_size()
    check_kv_budget(budget_tokens, per_token, available_memory(parameter.device), str(parameter.device))
    try:
        return TargetEngine(model, vocab_size, budget_tokens)
    except (RuntimeError, torch.OutOfMemoryError) as exc:  # the allocation itself failed
        raise ConfigError(f"pool.kv_budget_tokens ({budget_tokens}): the KV cache could not be "
                          f"allocated ({str(exc).splitlines()[0]}); lower it") from None


def available_memory(device: Any) -> int | None:
    """Bytes free for the KV arena on ``device`` (None: unknown)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    # On a CPU the arena's pages are committed as sessions use them: only a budget beyond the
    # machine's memory (RAM + swap) can never fit.
    try:
        with open("/proc/meminfo") as info:
            fields = dict(line.split(":", 1) for line in info)
        return sum(int(fields[name].split()[0]) * 1024 for name in ("MemTotal", "SwapTotal"))
    except (OSError, KeyError, ValueError):
        return None


def build_draft_backend(settings: Settings) -> DraftBackend:
    """The configured draft backend on the configured device (or its fallback: see devices)."""
    set_torch_threads(settings.models.torch_threads)
    return build_drafter(settings)


def require_standalone(backend: DraftBackend, name: str) -> None:
    """Draft-only generation needs a draft that drafts without a target: ModelLoadError (exit 2)
    for a feature draft, which drafts from the target's hidden states."""
    if not backend.standalone:
        raise ModelLoadError(f"models.draft {name!r} is a feature draft: it drafts only inside speculative "
                             "sessions, from the target's hidden states; for draft-only output use "
                             "--draft-model smollm2-135m-draft")


def edge_config(settings: Settings, max_context: int = 0) -> EdgeConfig:
    edge = settings.edge
    return EdgeConfig(gamma=draft_gamma(settings), max_support=edge.max_support,
                      verdict_timeout_s=edge.verdict_timeout_s, tenant=edge.tenant,
                      target_model=settings.models.target, adaptive_gamma=edge.adaptive_gamma,
                      gamma_min=edge.gamma_min, gamma_max=edge.gamma_max, draft_ahead=edge.draft_ahead,
                      draft_confidence=draft_confidence(settings),
                      draft_open_confidence=draft_confidence(settings, opening=True),
                      resend_after_s=edge.resend_after_s, verdict_secret=settings.redis.verdict_secret,
                      max_context=max_context)


def draft_gamma(settings: Settings) -> int:
    """``edge.gamma`` when set anywhere (settings file, environment, flag), else what models.draft
    recommends (``smollm2-135m-int4``: 8), else DEFAULT_GAMMA; at most ``limits.max_gamma``."""
    if settings.edge.gamma is not None:
        return settings.edge.gamma
    try:
        recommended = recommended_gamma(settings.models.draft, settings.edge.cache_dir)
    except ModelLoadError:  # a draft that cannot load fails where it is loaded, with its own error
        recommended = 0
    return min(recommended or DEFAULT_GAMMA, settings.limits.max_gamma)


def draft_confidence(settings: Settings, opening: bool = False) -> float:
    """``edge.draft_confidence`` (``edge.draft_open_confidence`` when ``opening``), or when unset
    what models.draft recommends (0 without a model)."""
    chosen = settings.edge.draft_open_confidence if opening else settings.edge.draft_confidence
    if chosen is not None:
        return chosen
    key = "specd_open_confidence" if opening else "assistant_confidence_threshold"
    try:
        return recommended_draft_confidence(settings.models.draft, settings.edge.cache_dir, key)
    except ModelLoadError:  # a draft that cannot load fails where it is loaded, with its own error
        return 0.0


def backend_context(backend: DraftBackend) -> int:
    """Positions the draft model can take (0 when the backend does not say, e.g. replay)."""
    return context_length(getattr(getattr(backend, "model", None), "config", None))


def edge_broker(settings: Settings, broker: Broker) -> Broker:
    """The edge's view of the broker: multiplexed verdict reads and network shaping when set."""
    edge = settings.edge
    if edge.multiplex_verdicts:
        broker = MultiplexedBroker(broker, tenant=edge.tenant)
    if edge.network_delay_ms or edge.network_jitter_ms:
        broker = ShapedBroker(broker, edge.network_delay_ms, edge.network_jitter_ms)
    return broker


def build_edge(settings: Settings, broker: Broker) -> EdgeClient:
    if not settings.redis.verdict_secret:
        log.warning("edge.no_verdict_secret", risk=NO_SECRET_RISK)
    backend = build_draft_backend(settings)
    backend.warm_up(gamma=draft_gamma(settings))  # kernels and allocator warm before a user's tokens
    context = backend_context(backend)
    check_fits_model(settings, context, "models.draft")
    return EdgeClient(backend, edge_broker(settings, broker), edge_config(settings, context),
                      settings.edge.max_concurrent_sessions)
