"""Settings: ``settings.toml``, then ``SPECD_*`` environment variables, then CLI flags.

One ``Settings`` object is built per process, validated at construction: an unknown key (in the
TOML file or the environment) or an invalid value fails at start-up with a message that names
the key. Nested sections use ``__`` in environment variables, e.g. ``SPECD_EDGE__GAMMA=6``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings.exceptions import SettingsError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_PREFIX = "SPECD_"
CONFIG_ENV = "SPECD_CONFIG"
"""Path of the TOML file; defaults to ``./settings.toml`` when that exists."""


_TRUE, _FALSE = frozenset({"true", "1"}), frozenset({"false", "0"})


def _strict_bool(value: Any) -> Any:
    """True/false only: a TOML boolean, or (environment) "true"/"false"/"1"/"0"; "yes" is an error."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"must be true or false, not {value!r}")


Bool = Annotated[bool, BeforeValidator(_strict_bool)]
"""A boolean setting that coerces nothing but true/false (and 1/0 from the environment)."""


class Section(BaseModel):
    # Attribute docstrings become field descriptions: the CLI's --help text comes from them.
    # No inf/nan: an infinite timeout is a hang, not a setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True,
                              allow_inf_nan=False)


class RedisSettings(Section):
    url: str = ""
    """Redis URL (redis://, rediss://, unix://), or a Redis Cluster's seed nodes
    (redis+cluster://host:port,host:port; rediss+cluster:// with TLS; docs/cluster.md).
    Empty: demo, generate and loadtest start an embedded Redis; the other commands need a URL."""
    key_prefix: str = Field("specd", min_length=1, max_length=64)
    """Prefix of every key this deployment uses (no braces: they are Redis Cluster hash tags)."""
    stream_maxlen: int = Field(1000, ge=10)
    """Approximate MAXLEN of every per-session stream."""
    session_ttl_s: int = Field(600, ge=5)
    """TTL refreshed on every session key at each round: abandoned sessions clean themselves up."""
    socket_timeout_s: float = Field(30.0, gt=0)
    """Socket connect/read timeout (seconds)."""
    startup_wait_s: float = Field(10.0, ge=0, le=3600)
    """How long a command keeps retrying an unreachable Redis at start-up before it gives up."""
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
    """Shared by edges and verifiers (same value on all): each session's key (the MACs of its
    opens, drafts and verdicts) is derived from it, so a client without it cannot change an
    output even with full access to Redis. Empty on a shared Redis: integrity then rests on Redis
    ACLs alone (a warning at start-up); the embedded Redis gets a random one per run. Prefer
    SPECD_REDIS__VERDICT_SECRET; docs/security.md."""

    @field_validator("key_prefix")
    @classmethod
    def _no_hash_tags(cls, value: str) -> str:
        if "{" in value or "}" in value or any(c.isspace() for c in value):
            raise ValueError("must not contain braces or spaces (braces are Redis Cluster hash tags)")
        return value

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://", "redis+cluster://",
                                           "rediss+cluster://")):
            raise ValueError("must start with redis://, rediss://, unix:// or redis+cluster:// (or be empty)")
        if "+cluster://" in value:
            nodes = value.split("://", 1)[1].split("/", 1)[0].split(",")
            if not all(_host(node) for node in nodes):
                raise ValueError("a redis+cluster:// URL names its seed nodes: redis+cluster://host:port[,host:port]")
        return value

    @model_validator(mode="after")
    def _tls_needs_rediss(self) -> RedisSettings:
        tls = [name for name in ("tls_ca_file", "tls_cert_file", "tls_key_file") if getattr(self, name)]
        if tls and not self.url.startswith(("rediss://", "rediss+cluster://")):
            raise ValueError(f"{', '.join(tls)} need a rediss:// url")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return self


MODEL_PAIRS: dict[str, tuple[str, str]] = {
    "smollm2": ("smollm2-135m-instruct", "smollm2-135m-int4"),
    "tiny": ("bundled:target", "bundled:draft"),
}
"""``--pair NAME``: (target, draft). smollm2 is the default (a real instruct model and, as its
draft, itself in 4-bit weights), tiny the bundled 14M-parameter code pair that the tests run on."""


class ModelSettings(Section):
    target: str = MODEL_PAIRS["smollm2"][0]
    """Target model: a named model (specd models), a .gguf file, a Hugging Face causal-LM folder,
    a hub id, or bundled:target."""
    draft: str = MODEL_PAIRS["smollm2"][1]
    """Draft model: a named model (specd models), a .gguf file, a Hugging Face causal-LM folder,
    a hub id, or bundled:draft."""
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    """Torch dtype of the models (and of the draft when edge.precision is auto)."""
    target_device: str = "cpu"
    """Torch device of the target (verifier). The draft's device is ``edge.device``."""
    torch_threads: int = Field(0, ge=0)
    """Torch (and OpenVINO CPU draft) intra-op threads per process; 0 keeps the library default."""
    trust_remote_code: Bool = False
    """Allow model repositories with custom code (off: only transformers' own architectures)."""


class SamplingSettings(Section):
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    """0 means greedy decoding."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = Field(0, ge=0)
    """0 disables top-k filtering."""
    seed: int | None = Field(None, ge=0)
    """Per-session seed; unset draws a fresh one per session (reported in the results)."""
    max_new_tokens: int = Field(64, ge=1)
    """Tokens to generate per session (prompt + these must fit the models' context)."""


WORKER_ID_PATTERN = r"^[A-Za-z0-9_.:@+-]{0,128}$"
"""Worker ids name keys, log lines and table rows: no spaces, braces (hash tags) or control characters."""
TENANT_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""A tenant name: the part of a session id before its first dot, so never a dot itself."""


class VerifierSettings(Section):
    worker_id: str = Field("", pattern=WORKER_ID_PATTERN)
    """Empty: hostname-pid."""
    max_batch_sessions: int = Field(64, ge=1)
    """Most sessions verified in one forward pass."""
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

    lease_ms: int = Field(3000, ge=200, le=600_000)
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
    kv_budget_tokens: int = Field(32768, ge=1)
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
    open_expiry_s: float = Field(60.0, ge=0, le=86400)
    """A session open that waited longer than this (queued or deferred) is refused with
    ``session_expired`` instead of being served late; 0: never."""
    open_grace_s: float = Field(10.0, ge=0, le=86400)
    """Edges write a session's first draft before its open: an open whose session has no draft
    stream is dropped unanswered once it is this old, and at once while its tenant has a backlog
    (more than ``opens_per_read`` opens waiting), so that idle opens never hold a tenant's live
    sessions back. A slow edge re-sends its open after its first draft."""
    adopted_idle_s: float = Field(30.0, ge=0, le=86400)
    """An adopted session, or one taken before its edge drafted, that gets no draft within this many
    seconds is ended (``expired``): sessions that finished after a Redis snapshot come back from it
    with no edge, and an open's edge may be gone."""
    janitor_interval_s: float = Field(60.0, ge=0, le=86400)
    """How often a verifier gives session-pattern keys that have no TTL (a tenant's own streams,
    ghost drafts streams) the session TTL, a bounded SCAN step each time; 0: never."""
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

    @field_validator("names", "overrides")
    @classmethod
    def _tenant_names(cls, value: Any) -> Any:
        bad = [name for name in value if not re.fullmatch(TENANT_PATTERN, name)]
        if bad:
            raise ValueError(f"tenant name(s) {', '.join(map(repr, bad))}: letters, digits, '_' and '-' only "
                             "(1-64; a dot ends the tenant part of a session id)")
        return value

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


DRAFTERS: dict[str, bool] = {}
"""The draft backends by name (value: whether the router may pick it), filled by the drafter
registry (``edge_worker.drafters``) as it registers them: common imports nothing of ours, so the
settings check ``edge.backend`` and ``edge.drafts[].backend`` against it once it is filled (the
CLI fills it before it reads settings; ``create_backend`` checks the name again in any case)."""

DRAFTER_NAME = r"^[a-z][a-z0-9_]{0,31}$"


def _known_drafter(name: str, routable: bool = False) -> str:
    known = sorted(n for n, can_route in DRAFTERS.items() if can_route or not routable)
    if DRAFTERS and name not in known:
        raise ValueError(f"unknown draft backend {name!r}; choose one of {', '.join(known)}")
    return name


class DraftSpec(Section):
    """One named drafter the router may pick (``edge.drafts``); all share the target's vocabulary."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]{1,32}$")
    backend: str = Field("torch", pattern=DRAFTER_NAME)
    """A drafter the router may pick (``specd devices`` lists them): torch, openvino, genai,
    prompt_lookup, or one registered beside them."""
    model: str = ""
    """Model (folder, hub id, bundled:NAME); empty: models.draft. prompt_lookup: only its tokenizer."""
    fallback: str = ""
    """prompt_lookup only: the name of another entry that drafts when no n-gram matches."""
    domains: list[Literal["code", "prose", "long", "short"]] = []
    """Prompts this drafter is meant for: the router's first pick before it has history."""

    @field_validator("backend")
    @classmethod
    def _routable(cls, name: str) -> str:
        return _known_drafter(name, routable=True)


DEFAULT_GAMMA = 4  # draft tokens per round when neither the settings nor the draft say


class EdgeSettings(Section):
    worker_id: str = Field("", pattern=WORKER_ID_PATTERN)
    """Empty: hostname-pid."""
    backend: str = Field("torch", pattern=DRAFTER_NAME)
    """Draft backend: torch, openvino (CPU/GPU/NPU), genai (ONNX Runtime GenAI), replay (no
    model: proposes a precomputed target continuation, for load tests), prompt_lookup (no model:
    n-gram copies from the context), router (picks one of ``edge.drafts`` per session), or any
    drafter registered beside them (``specd devices`` lists them all)."""
    drafts: list[DraftSpec] = []
    """The router's drafters; empty: models.draft, prompt lookup, and prompt lookup beside it."""
    lookup_max_ngram: int = Field(3, ge=1)
    """Prompt lookup: longest suffix n-gram searched for in the context."""
    lookup_min_ngram: int = Field(1, ge=1)
    """Prompt lookup: shortest n-gram that still counts as a match."""
    lookup_with_model: Bool = False
    """backend = prompt_lookup: draft with models.draft (torch) when no n-gram matches."""
    device: str = Field("cpu", pattern=DEVICE_PATTERN)
    """Draft device for every backend: auto, cpu, cuda[:N], gpu[.N], npu."""
    device_fallback: Literal["fallback", "fail"] = "fallback"
    """When the device is missing: fall back to the backend's CPU (logged), or fail at start-up."""
    precision: Literal["auto", "f32", "f16", "bf16", "int8", "int4"] = "auto"
    """Draft precision; auto follows models.dtype. f32 is the exact one."""
    cache_dir: str = ""
    """Where converted models are kept (OpenVINO IR, GenAI folders, GGUF files dequantised to
    safetensors, for the target too); empty: ~/.cache/specd."""
    gamma: int | None = Field(None, ge=0)
    """Draft tokens per round (fixed), or the starting point of adaptive gamma. Unset: what
    models.draft recommends (a named model's own figure, a folder's ``num_assistant_tokens`` in
    its generation_config.json), else DEFAULT_GAMMA (``specd.runtime.draft_gamma``)."""
    adaptive_gamma: Bool = False
    """Choose gamma per round from observed acceptance and costs, within gamma_min..gamma_max."""
    gamma_min: int = Field(1, ge=1)
    """Adaptive gamma's lower bound."""
    gamma_max: int = Field(8, ge=1)
    """Adaptive gamma's upper bound (at most limits.max_gamma)."""
    draft_ahead: Bool = False
    """Draft the next batch while the current one is verified (used iff fully accepted)."""
    draft_confidence: float | None = Field(None, ge=0.0, le=1.0)
    """End a round's drafting after a token the draft itself gives less than this probability
    (model drafts; 0: always draft gamma tokens). Unset: what the draft's generation_config.json
    recommends (transformers' ``assistant_confidence_threshold``; the shipped SmolLM2 draft: 0.6),
    else 0. Output is unchanged; a weak draft wastes fewer drafted tokens and verifier rows."""
    draft_open_confidence: float | None = Field(None, ge=0.0, le=1.0)
    """A round drafts nothing when the draft's most likely first token has less than this
    probability (model drafts; 0: always draft). Worth it where a verifier pass over one row is
    much cheaper than over two (a CPU verifier: 55 against 87 ms for SmolLM2-135M, see
    docs/edge.md); on a GPU, rows are nearly free, so set 0 there. Unset: what the draft's
    generation_config.json recommends (``specd_open_confidence``; the shipped SmolLM2 draft: 0.5),
    else 0. Decided before the token is chosen, from the context alone: output is unchanged and
    sampling stays exact."""
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
    multiplex_verdicts: Bool = False
    """Read every session's verdicts with one XREAD per edge process instead of one per session."""

    @field_validator("backend")
    @classmethod
    def _registered(cls, name: str) -> str:
        return _known_drafter(name)

    @field_validator("gamma")
    @classmethod
    def _drafts_at_all(cls, value: int | None) -> int | None:
        if value == 0:  # a "speculative" session that never drafts: the target alone, but slower
            raise ValueError("must be at least 1: each round drafts gamma tokens; for the target "
                             "alone use `specd generate --mode target`")
        return value

    @field_validator("drafts")
    @classmethod
    def _drafts_refer_to_each_other(cls, drafts: list[DraftSpec]) -> list[DraftSpec]:
        names = [d.name for d in drafts]
        if len(set(names)) != len(names):
            raise ValueError(f"edge.drafts names must be unique, got {names}")
        models = {d.name for d in drafts if d.backend != "prompt_lookup"}
        for draft in drafts:
            if draft.fallback and (draft.backend != "prompt_lookup" or draft.fallback not in models):
                raise ValueError(f"edge.drafts {draft.name!r}: a fallback ({draft.fallback!r}) needs a "
                                 f"prompt_lookup entry naming a model entry "
                                 f"({', '.join(sorted(models)) or 'none'})")
        return drafts


class LimitSettings(Section):
    max_message_bytes: int = Field(1 << 20, ge=1024, le=512 << 20)
    """Largest message a verifier accepts."""
    max_prompt_tokens: int = Field(8192, ge=1)
    """Longest prompt a verifier accepts (the target's context bounds it too)."""
    max_new_tokens: int = Field(8192, ge=1)
    """Largest sampling.max_new_tokens a verifier accepts."""
    max_gamma: int = Field(16, ge=1, le=1024)
    """Largest draft a session may send per round."""
    max_support: int = Field(256, ge=1, le=65536)
    """Largest sparse support per drafted position a verifier accepts."""


class LogSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level logged (to stderr). `generate` on a terminal shows only warnings unless given."""
    format: Literal["auto", "json", "console"] = "auto"
    """auto: readable console on a terminal, JSON lines otherwise."""
    redis_stream: Bool = False
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
    host: str = "127.0.0.1"
    """Address the metrics endpoint binds to (0.0.0.0: every interface, e.g. in a container)."""


class TracingSettings(Section):
    """OpenTelemetry traces: one per session across edge and verifier (docs/operations.md)."""

    otlp_endpoint: str = ""
    """OTLP/HTTP traces URL (e.g. http://127.0.0.1:4318/v1/traces); empty with no file: tracing off."""
    file: str = ""
    """Also (or only) append finished spans to this file as JSON lines."""


class ServeSettings(Section):
    """``specd serve``: the OpenAI-compatible HTTP endpoint on the edge (docs/serve.md)."""

    host: str = "127.0.0.1"
    """Address the HTTP server binds to; 0.0.0.0 exposes it beyond this machine."""
    port: int = Field(8000, ge=0, le=65535)
    max_concurrent: int = Field(32, ge=1)
    """Requests (speculative sessions) served at once; more wait in the queue."""
    queue_size: int = Field(128, ge=0)
    """Requests that may wait (FIFO) for a slot past max_concurrent; one more gets 429. 0: no queue."""
    queue_timeout_s: float = Field(60.0, gt=0)
    """Longest wait in the queue; a request still waiting then gets 429."""
    api_keys: dict[str, str] = Field(default_factory=dict)
    """Bearer token -> tenant; empty: no key needed and sessions carry edge.tenant."""
    model_name: str = ""
    """Model id the API answers to (and /v1/models lists); empty: models.target."""
    context_tokens: int = Field(0, ge=0)
    """Prompt + max_tokens limit per request; 0: the tokenizer's model_max_length."""
    pool_check_timeout_s: float = Field(2.0, gt=0)
    """How long a request waits for Redis to answer the pool check before a 503."""

    @field_validator("api_keys")
    @classmethod
    def _tenant_ids(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [tenant for tenant in value.values() if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", tenant)]
        if bad or any(not key for key in value):
            raise ValueError("keys must be non-empty and tenants match [A-Za-z0-9_-]{1,64}")
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid",
        validate_default=True, case_sensitive=False, allow_inf_nan=False,
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
    tracing: TracingSettings = TracingSettings()
    serve: ServeSettings = ServeSettings()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        bounds = [
            ("edge.gamma", self.edge.gamma, "limits.max_gamma", self.limits.max_gamma),
            ("edge.gamma_max", self.edge.gamma_max, "limits.max_gamma", self.limits.max_gamma),
            ("edge.gamma_min", self.edge.gamma_min, "edge.gamma_max", self.edge.gamma_max),
            ("edge.max_support", self.edge.max_support, "limits.max_support", self.limits.max_support),
            ("sampling.max_new_tokens", self.sampling.max_new_tokens, "limits.max_new_tokens",
             self.limits.max_new_tokens),
        ]
        for name, value, bound_name, bound in bounds:
            if value is not None and value > bound:
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


def load_settings(overrides: dict[str, dict[str, Any]] | None = None,
                  flag_names: dict[str, str] | None = None) -> Settings:
    """Build the process's settings; ``overrides`` are CLI values (``None`` entries dropped).

    ``flag_names`` maps ``section.key`` to the flag that set it, so that an invalid value is
    blamed on the flag, the environment variable or the file it really came from.
    """
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
    _check_toml_syntax(path)
    try:
        return Settings(**cleaned)  # type: ignore[arg-type]  # sections validated from dicts
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, cleaned, flag_names or {})) from None
    except SettingsError as exc:  # an environment value that is not valid JSON for its section
        raise ConfigError(_describe_env_json(exc)) from None


def _check_toml_syntax(path: Path | None) -> None:
    if path is None:
        return
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the settings file: {exc}") from None
    quoted = _quoted_numbers(data)
    if quoted:
        raise ConfigError(f"{path}: {', '.join(quoted)}: a number written as a string; write it unquoted")


def _host(node: str) -> str:
    """The host of ``[user:password@]host[:port]``."""
    address = node.rpartition("@")[2]
    return address.rpartition(":")[0] if ":" in address else address


def _quoted_numbers(data: dict[str, Any]) -> list[str]:
    """TOML settings whose field is a number but whose value is a string ("3000"): the environment
    has only strings, a file has types, and a quoted number there is a mistake worth naming."""
    found = []
    for section, values in data.items():
        field = Settings.model_fields.get(section)
        model = getattr(field, "annotation", None)
        if not isinstance(values, dict) or not isinstance(model, type) or not issubclass(model, BaseModel):
            continue
        for key, value in values.items():
            inner = model.model_fields.get(key)
            if inner is not None and isinstance(value, str) and _numeric(inner.annotation):
                found.append(f"[{section}] {key} = {value!r}")
    return found


def _numeric(annotation: Any) -> bool:
    options = getattr(annotation, "__args__", None) or (annotation,)
    return any(option in (int, float) for option in options) and str not in options


def _describe_env_json(exc: SettingsError) -> str:
    """Name the ``SPECD_*`` variable whose value is not the JSON its setting needs."""
    for name, value in os.environ.items():
        if not name.upper().startswith(ENV_PREFIX) or name.upper() == CONFIG_ENV:
            continue
        if value.lstrip()[:1] in "{[":
            try:
                json.loads(value)
            except json.JSONDecodeError as bad:
                return (f"{name}: not valid JSON ({bad.msg} at character {bad.pos}); e.g. "
                        f"{ENV_PREFIX}TENANTS__OVERRIDES='{{\"acme\": {{\"max_sessions\": 4}}}}'")
    return f"invalid setting in the environment: {exc}"


def _source_of(key: str, cleaned: dict[str, dict[str, Any]], flag_names: dict[str, str],
               path: Path | None) -> str:
    """Where a ``section.key`` value came from: a flag, an environment variable or the file."""
    section, _, name = key.partition(".")
    field = name.split(".")[0]
    if field in cleaned.get(section, {}):
        return flag_names.get(f"{section}.{field}", "the command line")
    for env_name in (f"{ENV_PREFIX}{section}__{field}".upper(), f"{ENV_PREFIX}{section}".upper()):
        if any(n.upper() == env_name for n in os.environ):
            return f"environment {env_name}"
    return f"settings file {path}" if path is not None else "the defaults"


def _describe(exc: ValidationError, path: Path | None, cleaned: dict[str, dict[str, Any]] | None = None,
              flag_names: dict[str, str] | None = None) -> str:
    lines = ["invalid configuration:"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "settings"
        message = error["msg"].removeprefix("Value error, ")
        where = _source_of(key, cleaned or {}, flag_names or {}, path) if "." in key else ""
        label = f"{key}: " if error["loc"] else ""
        lines.append(f"  {label}{message}" + (f" (from {where})" if where else ""))
    return "\n".join(lines)


def context_length(config: Any) -> int:
    """Positions a Hugging Face model config can attend to (0: unknown, no limit known)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def check_fits_model(settings: Settings, context: int, model_key: str) -> None:
    """Settings that would make every session fail on a model with ``context`` positions."""
    new = settings.sampling.max_new_tokens
    if context and new >= context:
        raise ConfigError(
            f"sampling.max_new_tokens ({new}) does not fit the context of {model_key} "
            f"({getattr(settings.models, model_key.split('.')[-1])}: {context} positions); "
            f"use at most {context - 1} (--max-new-tokens)")


def check_kv_budget(budget_tokens: int, bytes_per_token: int, available_bytes: int | None,
                    device: str) -> None:
    """A KV budget the device cannot hold fails at start-up naming pool.kv_budget_tokens."""
    need = budget_tokens * bytes_per_token
    if available_bytes is None or need <= available_bytes:
        return
    fits = max(1, available_bytes // max(bytes_per_token, 1))
    raise ConfigError(
        f"pool.kv_budget_tokens ({budget_tokens}) needs {need / 2**30:.1f} GiB of KV cache on {device}, "
        f"it has {available_bytes / 2**30:.1f} GiB; set it to at most {fits} "
        "(SPECD_POOL__KV_BUDGET_TOKENS or [pool] kv_budget_tokens)")

