"""Prometheus metrics of ``specd serve``: requests by route and status, in flight, the queue (length,
wait, refusals), TTFT, tokens.

``/metrics`` shows this registry, the edge client's and (embedded default) the in-process
verifier's: one scrape sees the HTTP layer, the sessions and the batching.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from common.metrics import LATENCY_BUCKETS


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("specd_serve_requests_total", "HTTP API requests, by route and status.",
                                ["route", "status"], registry=r)
        self.in_flight = Gauge("specd_serve_requests_in_flight", "Requests being served (sessions).",
                               registry=r)
        self.first_token = Histogram("specd_serve_time_to_first_token_seconds",
                                     "Request received to its first text.", buckets=LATENCY_BUCKETS,
                                     registry=r)
        self.duration = Histogram("specd_serve_request_seconds", "Request received to its last byte.",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("specd_serve_completion_tokens_total", "Completion tokens returned.",
                              ["tenant"], registry=r)
        self.queue_length = Gauge("specd_serve_queue_length",
                                  "Requests waiting for a slot (past serve.max_concurrent).", registry=r)
        self.queue_wait = Histogram("specd_serve_queue_wait_seconds",
                                    "Time a request waited for its slot (0 when one was free).",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.queue_rejected = Counter("specd_serve_queue_rejected_total",
                                      "Requests refused with 429: queue full, or waited past "
                                      "serve.queue_timeout_s.", ["reason"], registry=r)
        self.disconnects = Counter("specd_serve_client_disconnects_total",
                                   "Streams whose client went away; their sessions were cancelled.",
                                   registry=r)

    def request(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()


def exposition(registries: list[CollectorRegistry]) -> bytes:
    return b"".join(generate_latest(registry) for registry in registries)
