"""Prometheus metrics of the verifier and edge workers (prometheus-client).

Each worker object owns a fresh ``CollectorRegistry``: nothing is registered globally, so
several workers in one process (tests, ``specd generate``) never collide and a new run starts
from zero. The worker calls a few ``observe_*`` methods from the places that already log the
same facts; ``serve`` exposes a registry on ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ADMISSION_OUTCOMES = ("admitted", "passed_on", "deferred", "refused_capacity", "refused_busy",
                      "dropped_no_edge")


class VerifierMetrics:
    """Sessions, rounds, tokens, batches, latencies, KV memory and errors of one verifier."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.sessions = Gauge("specd_verifier_sessions", "Sessions owned by this verifier.",
                              ["tenant"], registry=r)
        self.sessions_opened = Counter("specd_verifier_sessions_opened_total", "Sessions opened.",
                                       ["tenant"], registry=r)
        self.sessions_finished = Counter("specd_verifier_sessions_finished_total",
                                         "Sessions finished, by reason (stop, length, aborted, expired).",
                                         ["tenant", "reason"], registry=r)
        self.rounds = Counter("specd_verifier_rounds_total", "Verified rounds (one per draft).",
                              ["tenant"], registry=r)
        self.drafted = Counter("specd_verifier_drafted_tokens_total", "Drafted tokens received.",
                               ["tenant"], registry=r)
        self.accepted = Counter("specd_verifier_accepted_tokens_total", "Drafted tokens accepted.",
                                ["tenant"], registry=r)
        self.accepted_length = Histogram("specd_verifier_accepted_length_tokens",
                                         "Drafted tokens accepted per round.", ["tenant"],
                                         buckets=TOKEN_BUCKETS, registry=r)
        self.batch_size = Histogram("specd_verifier_batch_sessions", "Sessions per forward pass.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.forward_passes = Counter("specd_verifier_forward_passes_total", "Target forward passes.",
                                      registry=r)
        self.queue_depth = Gauge("specd_verifier_queue_depth_drafts",
                                 "Drafts received and waiting for a forward pass.", registry=r)
        self.queue_seconds = Histogram("specd_verifier_queue_seconds",
                                       "From a draft's send (edge clock) to the start of its batch.",
                                       ["tenant"], buckets=LATENCY_BUCKETS, registry=r)
        self.verify_seconds = Histogram("specd_verifier_verify_seconds",
                                        "One batched forward pass with rejection sampling.",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.kv_bytes = Gauge("specd_verifier_kv_cache_bytes", "Bytes held by session KV caches.",
                              registry=r)
        self.errors = Counter("specd_verifier_errors_total", "Rejected messages, by error code.",
                              ["code"], registry=r)
        self.throttled = Counter("specd_verifier_throttled_drafts_total",
                                 "Drafts held back for their tenant's draft-token rate.", ["tenant"],
                                 registry=r)
        self.admission = Counter("specd_verifier_admission_total",
                                 "Session opens by admission outcome (admitted, passed_on, deferred, "
                                 "refused_capacity, refused_busy, dropped_no_edge).", ["outcome"], registry=r)
        for outcome in ADMISSION_OUTCOMES:  # present at 0 from the start: alerts see "none", not "no data"
            self.admission.labels(outcome)
        self.max_batch_sessions = Gauge("specd_verifier_max_batch_sessions",
                                        "Configured sessions per forward pass (batch fill's denominator).",
                                        registry=r)
        self.kv_budget_tokens = Gauge("specd_verifier_kv_budget_tokens",
                                      "Configured KV budget of this verifier, in tokens.", registry=r)
        self.redis_up = Gauge("specd_verifier_redis_up",
                              "1 while this verifier's last lease/heartbeat tick reached Redis, else 0.",
                              registry=r)

    def session_opened(self, tenant: str) -> None:
        self.sessions_opened.labels(tenant).inc()
        self.sessions.labels(tenant).inc()

    def session_finished(self, tenant: str, reason: str) -> None:
        self.sessions_finished.labels(tenant, reason).inc()
        self.sessions.labels(tenant).dec()

    def observe_round(self, tenant: str, drafted: int, accepted: int, queue_ms: float) -> None:
        self.rounds.labels(tenant).inc()
        self.drafted.labels(tenant).inc(drafted)
        self.accepted.labels(tenant).inc(accepted)
        self.accepted_length.labels(tenant).observe(accepted)
        self.queue_seconds.labels(tenant).observe(queue_ms / 1000)

    def track(self, kv_bytes: Callable[[], float], queue_depth: Callable[[], float]) -> None:
        """Gauges read at scrape time, so they are right even when no batch runs (after expiry)."""
        self.kv_bytes.set_function(kv_bytes)
        self.queue_depth.set_function(queue_depth)

    def observe_batch(self, size: int, verify_ms: float) -> None:
        self.forward_passes.inc()
        self.batch_size.observe(size)
        self.verify_seconds.observe(verify_ms / 1000)

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def configured(self, max_batch_sessions: int, kv_budget_tokens: int) -> None:
        self.max_batch_sessions.set(max_batch_sessions)
        self.kv_budget_tokens.set(kv_budget_tokens)

    def admission_outcome(self, outcome: str, count: int = 1) -> None:
        self.admission.labels(outcome).inc(count)

    def redis_reachable(self, up: bool) -> None:
        self.redis_up.set(1 if up else 0)

    def draft_throttled(self, tenant: str) -> None:
        self.throttled.labels(tenant).inc()


class EdgeMetrics:
    """Sessions, rounds, tokens and end-to-end latencies seen by one edge process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.sessions = Gauge("specd_edge_sessions", "Sessions running on this edge.", ["tenant"],
                              registry=r)
        self.sessions_finished = Counter("specd_edge_sessions_finished_total",
                                         "Sessions ended, by outcome (stop, length, or an error code).",
                                         ["tenant", "outcome"], registry=r)
        self.rounds = Counter("specd_edge_rounds_total", "Rounds (draft sent, verdict applied).",
                              ["tenant"], registry=r)
        self.drafted = Counter("specd_edge_drafted_tokens_total", "Tokens drafted and sent.", ["tenant"],
                               registry=r)
        self.accepted = Counter("specd_edge_accepted_tokens_total", "Drafted tokens accepted.",
                                ["tenant"], registry=r)
        self.generated = Counter("specd_edge_generated_tokens_total", "Tokens committed to outputs.",
                                 ["tenant"], registry=r)
        self.accepted_length = Histogram("specd_edge_accepted_length_tokens",
                                         "Drafted tokens accepted per round.", ["tenant"],
                                         buckets=TOKEN_BUCKETS, registry=r)
        self.draft_seconds = Histogram("specd_edge_draft_seconds", "Drafting one round.", ["tenant"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.round_seconds = Histogram("specd_edge_round_seconds",
                                       "End to end: draft sent to verdict received.", ["tenant"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("specd_edge_errors_total", "Failed sessions, by error code.", ["code"],
                              registry=r)
        self.drafter_tokens = Counter("specd_edge_drafter_tokens_total",
                                      "Drafted and accepted tokens by drafter (kind: drafted, accepted).",
                                      ["drafter", "kind"], registry=r)

    def session_started(self, tenant: str) -> None:
        self.sessions.labels(tenant).inc()

    def session_ended(self, tenant: str, outcome: str) -> None:
        self.sessions.labels(tenant).dec()
        self.sessions_finished.labels(tenant, outcome).inc()

    def observe_round(self, tenant: str, drafted: int, accepted: int, committed: int, draft_ms: float,
                      round_ms: float, drafter: str = "") -> None:
        self.rounds.labels(tenant).inc()
        self.drafter_tokens.labels(drafter, "drafted").inc(drafted)
        self.drafter_tokens.labels(drafter, "accepted").inc(accepted)
        self.drafted.labels(tenant).inc(drafted)
        self.accepted.labels(tenant).inc(accepted)
        self.generated.labels(tenant).inc(committed)
        self.accepted_length.labels(tenant).observe(accepted)
        self.draft_seconds.labels(tenant).observe(draft_ms / 1000)
        self.round_seconds.labels(tenant).observe(round_ms / 1000)

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()


def serve(registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> Any:
    """Expose ``registry`` on http://host:port/metrics (a daemon thread); returns the server."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
