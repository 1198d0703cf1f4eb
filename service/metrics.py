"""Prometheus metrics, in a registry of the app's own (several apps can share a process).

Requests are counted per ``protocol``: ``rest`` (the JSON API: /predict, /models...),
``rest_v2`` (the inference protocol over HTTP, /v2/...) and ``grpc`` (the same protocol
over gRPC; ``route`` is the RPC, ``method`` is ``RPC`` and ``status`` the gRPC code
name). Every protocol feeds the same batcher, so the batch metrics cover them all.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "seednet_requests",
            "requests by protocol, route, method and status",
            ["protocol", "route", "method", "status"],
            registry=r,
        )
        self.errors = Counter(
            "seednet_request_errors",
            "failed requests (HTTP status >= 400, gRPC status other than OK)",
            ["protocol", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "seednet_request_duration_seconds",
            "request latency",
            ["protocol", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "seednet_batch_size", "images per forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "seednet_inference_seconds",
            "model time per forward pass",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "seednet_queue_wait_seconds",
            "time a request waits for its batch to start",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter("seednet_images_processed", "images classified", registry=r)
        self.model_info = Gauge(
            "seednet_model_info",
            "the serving model (value 1)",
            ["name", "version", "backend", "device"],
            registry=r,
        )
        self.model_swaps = Counter("seednet_model_swaps", "serving model replaced", registry=r)

    def on_request(
        self, protocol: str, route: str, method: str, status: str, failed: bool, seconds: float
    ) -> None:
        """One finished request of any protocol (``route`` is a template, never a raw path)."""
        self.requests.labels(protocol, route, method, status).inc()
        self.latency.labels(protocol, route).observe(seconds)
        if failed:
            self.errors.labels(protocol, route, status).inc()

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)
        self.images.inc(size)

    def on_wait(self, seconds: float) -> None:
        self.queue_wait.observe(seconds)

    def set_model(self, info: dict) -> None:
        self.model_info.clear()
        self.model_info.labels(info["name"], info["version"], info["backend"], info["device"]).set(
            1
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
