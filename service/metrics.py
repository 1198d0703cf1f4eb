"""Prometheus metrics, in a registry of the app's own (several apps can share a process).

With several worker processes (``SEEDNET_WORKERS``), ``python -m service`` points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder before the workers start: every worker
then writes its values there and any worker's ``/metrics`` renders the sum of all of
them (prometheus_client's multiprocess mode); gauges keep one series per live worker.

Requests are counted per ``protocol``: ``rest`` (the JSON API: /predict, /models...),
``rest_v2`` (the inference protocol over HTTP, /v2/...) and ``grpc`` (the same protocol
over gRPC; ``route`` is the RPC, ``method`` is ``RPC`` and ``status`` the gRPC code
name), refused ones too. Every protocol feeds the same data plane, so the stage times carry
the protocol and the batch metrics cover them all.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Where a request's time goes, in order: what limits a deployment shows here.
STAGES = ("read_body", "parse", "decode", "queue_wait", "model", "serialise")
PROTOCOLS = ("rest", "rest_v2", "grpc")

# Fine below 5 ms: on a GPU one image is served in about 1 to 4 ms, and a percentile is
# only as precise as the buckets around it.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.0075,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# The winning probability, finest near 1 where most answers are.
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# ood_score = -logsumexp(logits / T): about -10 for a confident answer, -2.3 (= -log 10)
# for a uniform one; a version's threshold sits between (about -3.7 for seednet@2).
OOD_BUCKETS = (-12, -10, -8, -7, -6, -5, -4.5, -4, -3.5, -3, -2.5, -2)
# An explanation takes tens of milliseconds to seconds (gradients, many images).
EXPLAIN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
EXPLAIN_OUTCOMES = ("done", "queue_full", "timeout", "invalid", "failed")


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class _ServingOnly:
    """A registry's metrics without the model-info series of models no longer served."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self):
        for metric in self.registry.collect():
            if metric.name == "seednet_model_info":
                metric.samples = [s for s in metric.samples if s.value]
            yield metric


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
        self.stage = Histogram(
            "seednet_stage_seconds",
            "time per request stage (" + ", ".join(STAGES) + ") and protocol",
            ["stage", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batches = Counter(
            "seednet_batches",
            "forward passes by how they formed: immediate (the queue was empty: run at once) "
            "or batched (merged with waiting requests)",
            ["mode"],
            registry=r,
        )
        self.model_info = Gauge(
            "seednet_model_info",
            "the serving model (value 1; one series per worker process)",
            ["name", "version", "backend", "device"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.confidence = Histogram(
            "seednet_confidence",
            "the winning (top-1) probability of every image answered, per model version",
            ["version"],
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.ood_score = Histogram(
            "seednet_ood_score",
            "the out-of-distribution score of every image answered (calibrated versions; "
            "higher: less like the training images), per model version",
            ["version"],
            buckets=OOD_BUCKETS,
            registry=r,
        )
        self.ood_flagged = Counter(
            "seednet_out_of_distribution",
            "images flagged out_of_distribution (ood_score above the version's threshold)",
            ["version"],
            registry=r,
        )
        self.model_swaps = Counter("seednet_model_swaps", "serving model replaced", registry=r)
        self.registry_errors = Counter(
            "seednet_registry_errors",
            "checks of the registry (alias following) that failed: the store could not be "
            "reached or read; the loaded model keeps serving",
            registry=r,
        )
        self.queue_images = Gauge(
            "seednet_queue_images",
            "images waiting for a batch (all workers)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.running_images = Gauge(
            "seednet_running_images",
            "images in the forward pass that is running or about to run (all workers)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.rejections = Counter(
            "seednet_rejections",
            "requests refused by admission control (queue_full: 429, deadline: 503)",
            ["reason"],
            registry=r,
        )

        # Explanations: their own worker process and queue (service.dataplane.explaining).
        self.explanations = Counter(
            "seednet_explanations",
            "explanation requests by outcome: done, queue_full (429), timeout (503), "
            "invalid (422), failed (503: the worker failed)",
            ["outcome"],
            registry=r,
        )
        self.explain_queue = Gauge(
            "seednet_explain_queue",
            "explanation requests waiting for the explanation worker (all workers)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.explain_running = Gauge(
            "seednet_explain_running",
            "explanation requests the explanation worker is computing (all workers)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.explain_queue_wait = Histogram(
            "seednet_explain_queue_wait_seconds",
            "time an explanation request waits for the explanation worker",
            buckets=EXPLAIN_BUCKETS,
            registry=r,
        )
        self.explain_seconds = Histogram(
            "seednet_explain_seconds",
            "explanation worker time per request (forward, backward, maps encoded)",
            buckets=EXPLAIN_BUCKETS,
            registry=r,
        )
        self.explain_images = Counter("seednet_explained_images", "images explained", registry=r)

    def on_request(
        self, protocol: str, route: str, method: str, status: str, failed: bool, seconds: float
    ) -> None:
        """One finished request of any protocol (``route`` is a template, never a raw path)."""
        self.requests.labels(protocol, route, method, status).inc()
        self.latency.labels(protocol, route).observe(seconds)
        if failed:
            self.errors.labels(protocol, route, status).inc()

    def on_batch(self, size: int, seconds: float, mode: str) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)
        self.batches.labels(mode).inc()
        self.images.inc(size)

    def observe_stage(self, stage: str, protocol: str, seconds: float) -> None:
        self.stage.labels(stage, protocol).observe(seconds)
        if stage == "queue_wait":
            self.queue_wait.observe(seconds)

    def on_answers(self, version: str, outputs: dict) -> None:
        """What the answers of one request looked like: confidence, OOD score, flags."""
        probs = outputs.get("probabilities")
        if probs is not None and len(probs):
            for p in probs.max(axis=1).tolist():
                self.confidence.labels(version).observe(p)
        scores = outputs.get("ood_score")
        if scores is not None:
            for v in scores.tolist():
                self.ood_score.labels(version).observe(v)
        flagged = outputs.get("out_of_distribution")
        if flagged is not None and flagged.any():
            self.ood_flagged.labels(version).inc(int(flagged.sum()))

    def on_queue(self, images: int) -> None:
        self.queue_images.set(images)

    def on_running(self, images: int) -> None:
        self.running_images.set(images)

    def on_reject(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def set_model(self, info: dict) -> None:
        """This process now serves ``info``'s model (and no other)."""
        labels = (info["name"], info["version"], info["backend"], info["device"])
        # In multiprocess mode a series, once written, stays in this worker's file:
        # clear() forgets it here only. Zero the old series instead; render() drops them.
        for sample in self.model_info.collect()[0].samples:
            old = tuple(sample.labels[k] for k in ("name", "version", "backend", "device"))
            if old != labels:
                self.model_info.labels(*old).set(0)
        self.model_info.labels(*labels).set(1)

    def render(self) -> bytes:
        path = multiprocess_dir()
        if path is None:
            return generate_latest(_ServingOnly(self.registry))
        merged = CollectorRegistry()  # every worker's files, summed
        multiprocess.MultiProcessCollector(merged, path=path)
        return generate_latest(_ServingOnly(merged))

    @staticmethod
    def worker_exited(pid: int) -> None:
        """Drop a finished worker's live gauges (multiprocess mode only)."""
        if multiprocess_dir() is not None:
            multiprocess.mark_process_dead(pid)
