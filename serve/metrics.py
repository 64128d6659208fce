"""The server's Prometheus metrics (prometheus_client; process metrics come with it).

Each app has a registry of its own, so two apps in one process (tests) never collide.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter("dsmd_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("dsmd_request_seconds", "Request latency.", ["endpoint"], buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.batches = Histogram("dsmd_encoder_batch_size", "Inputs per encoder call.", ["encoder"],
                                 buckets=BATCH_BUCKETS, registry=r)
        self.dropped = Counter("dsmd_encoder_dropped", "Inputs dropped before encoding (client gone or deadline).",
                               ["encoder"], registry=r)
        self.rejected = Counter("dsmd_rejected", "Requests answered 503 at admission.", ["reason"], registry=r)
        self.in_flight = Gauge("dsmd_in_flight", "Requests inside the server.", ["gate"], registry=r)
        self.queued = Gauge("dsmd_encoder_queued", "Inputs waiting for an encoder.", ["encoder"], registry=r)
        self.items = Gauge("dsmd_index_items", "Vectors searchable per collection and part.", ["collection", "part"],
                           registry=r)
        self.generation = Gauge("dsmd_index_generation", "Generation of the index manifest being served.",
                                ["collection"], registry=r)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
