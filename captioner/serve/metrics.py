"""Prometheus metrics of one app, in its own registry (two apps in one process never share counts)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("captioner_requests", "Caption requests answered, by HTTP status.", ["status"],
                                registry=r)
        self.items = Counter("captioner_items", "Items (images, sounds) answered, by outcome.", ["outcome"], registry=r)
        self.errors = Counter("captioner_errors", "Errors, by kind (input, options, malformed, too_many_files, "
                              "body_too_large, queue_full, timeout, not_ready, internal, ...).", ["kind"], registry=r)
        self.batch_size = Histogram("captioner_batch_size", "Items per model call.", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.queue_depth = Gauge("captioner_queue_depth", "Items waiting for the model.", registry=r)
        self.in_flight = Gauge("captioner_requests_in_flight", "Caption requests being served.", registry=r)
        self.request_latency = Histogram("captioner_request_latency_seconds", "Time from a request's arrival to "
                                         "its answer.", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("captioner_queue_wait_seconds", "Time a request waited for its batch.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.model_latency = Histogram("captioner_model_latency_seconds", "Time of one model call (a batch).",
                                       buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
