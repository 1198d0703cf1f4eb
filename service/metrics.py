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
# A rollout compares the p99 of two versions: 25 % steps from 0.5 ms to 10 s, so a ratio
# is read to within a bucket's width wherever the model time lies.
VERSION_BUCKETS = tuple(round(0.0005 * 1.25**k, 6) for k in range(45))
# The winning probability, finest near 1 where most answers are.
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
#: What a rollout decides (service.lifecycle.rollout); every value has a series from the start.
DECISIONS = ("check", "advance", "promote", "rollback", "abort")
#: Per-worker series that say what the worker serves now: a changed one is zeroed, not
#: removed (multiprocess mode keeps it in the worker's file), and left out of /metrics.
STATE_SERIES = ("seednet_model_info", "seednet_rollout_info")
MODEL_INFO = ("name", "version", "backend", "device")
ROLLOUT_INFO = ("name", "rollout", "stable", "candidate", "step", "state")
# Two scales, one set of buckets. energy (@2): -logsumexp(logits / T), about -10 for a
# confident answer, -2.3 (= -log 10) for a uniform one, thresholds near -3.7.
# density+energy (@3): a sum of two standardised scores, about 0 for a CIFAR image,
# thresholds near 3, noise in the hundreds.
OOD_BUCKETS = (-12, -10, -8, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 7.5, 10, 25, 100, 1000)
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
            if metric.name in STATE_SERIES:
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
            MODEL_INFO,
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
        self._rollout_metrics(r)

    def _rollout_metrics(self, r: CollectorRegistry) -> None:
        """Per-version evidence and the state of a rollout (docs/rollouts.md)."""
        per_version = ["name", "version", "traffic"]
        self.version_requests = Counter(
            "seednet_version_requests",
            "inference requests per model version; traffic: live (answered to the client) "
            "or shadow (also run on a rollout's candidate, off the request path)",
            per_version,
            registry=r,
        )
        self.version_errors = Counter(
            "seednet_version_errors",
            "inference requests whose forward pass failed or gave non-finite "
            "probabilities, per model version (a failed canary answer is retried on stable)",
            per_version,
            registry=r,
        )
        self.version_model_seconds = Histogram(
            "seednet_version_model_seconds",
            "forward-pass time of the batch that computed each request, per model version",
            per_version,
            buckets=VERSION_BUCKETS,
            registry=r,
        )
        self.version_confidence = Histogram(
            "seednet_version_confidence",
            "top-1 probability of every image answered, per model version",
            per_version,
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        pair = ["name", "stable", "candidate"]
        self.shadow_compared = Counter(
            "seednet_shadow_compared",
            "images run on both the stable version and the candidate (shadow traffic)",
            pair,
            registry=r,
        )
        self.shadow_agreed = Counter(
            "seednet_shadow_agreed",
            "shadowed images whose top-1 class is the same on both versions",
            pair,
            registry=r,
        )
        self.shadow_disagreements = Counter(
            "seednet_shadow_disagreements",
            "shadowed images whose top-1 class differs, by (stable label -> candidate label)",
            [*pair, "stable_label", "candidate_label"],
            registry=r,
        )
        self.shadow_probability_change = Counter(
            "seednet_shadow_probability_change",
            "sum over shadowed images of |candidate - stable| probability of stable's top-1 "
            "class; / seednet_shadow_compared_total = the mean absolute change",
            pair,
            registry=r,
        )
        self.shadow_dropped = Counter(
            "seednet_shadow_dropped",
            "shadow runs dropped because the shadow queue was full (live traffic comes first)",
            registry=r,
        )
        self.rollout_active = Gauge(
            "seednet_rollout_active",
            "1 while a rollout of the served alias runs (a candidate loaded beside stable)",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.rollout_step_seconds = Gauge(
            "seednet_rollout_step_seconds",
            "how long the running rollout's current step has lasted (0: no rollout)",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.rollout_decisions = Counter(
            "seednet_rollout_decisions",
            "rollout decisions this service took: " + ", ".join(DECISIONS),
            ["decision"],
            registry=r,
        )
        for decision in DECISIONS:
            self.rollout_decisions.labels(decision)
        self.rollout_info = Gauge(
            "seednet_rollout_info",
            "the rollout each worker process follows (value 1; one series per worker)",
            ROLLOUT_INFO,
            registry=r,
            multiprocess_mode="liveall",
        )
        self.rollout_revision = Gauge(
            "seednet_rollout_revision",
            "the revision of rollouts.json each worker process has applied",
            registry=r,
            multiprocess_mode="liveall",
        )

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
        _set_only(self.model_info, MODEL_INFO, {k: info[k] for k in MODEL_INFO})

    # -- per version, shadow traffic and rollouts

    def on_version_answer(
        self, info: dict, traffic: str, probabilities, model_seconds: float
    ) -> None:
        """A request answered by (or shadowed on) ``info``'s version; ``probabilities``
        is its rows ([images, classes])."""
        labels = (info["name"], info["version"], traffic)
        self.version_requests.labels(*labels).inc()
        self.version_model_seconds.labels(*labels).observe(model_seconds)
        confidence = self.version_confidence.labels(*labels)
        for p in probabilities.max(axis=1).tolist():
            confidence.observe(p)

    def on_version_error(self, info: dict, traffic: str) -> None:
        labels = (info["name"], info["version"], traffic)
        self.version_requests.labels(*labels).inc()
        self.version_errors.labels(*labels).inc()

    def on_shadow(
        self,
        stable: dict,
        candidate: dict,
        pairs: list[tuple[str, str]],
        changes: list[float],
    ) -> None:
        """Shadowed images compared: (stable label, candidate label) and the absolute
        change of stable's winning probability, one per image."""
        labels = (stable["name"], stable["version"], candidate["version"])
        self.shadow_compared.labels(*labels).inc(len(pairs))
        agreed = sum(a == b for a, b in pairs)
        if agreed:
            self.shadow_agreed.labels(*labels).inc(agreed)
        for a, b in pairs:
            if a != b:
                self.shadow_disagreements.labels(*labels, a, b).inc()
        self.shadow_probability_change.labels(*labels).inc(sum(changes))

    def set_rollout(
        self, labels: dict[str, str] | None, revision: int, step_seconds: float
    ) -> None:
        """The rollout this process follows now (None: none), the revision applied."""
        _set_only(self.rollout_info, ROLLOUT_INFO, labels)
        self.rollout_active.set(1 if labels is not None and labels["state"] == "running" else 0)
        self.rollout_step_seconds.set(step_seconds)
        self.rollout_revision.set(revision)

    # -- reading

    def samples(self) -> list:
        """Every sample of every worker (multiprocess mode: summed as /metrics shows them,
        per-worker gauges with a ``pid`` label); what rollout evidence is read from."""
        return [s for metric in self._view().collect() for s in metric.samples]

    def workers(self) -> list[dict]:
        """What each live worker process serves: pid, model version, the rollout it
        follows and the revision of rollouts.json it has applied."""
        own = str(os.getpid())
        found: dict[str, dict] = {}
        for s in self.samples():
            pid = s.labels.get("pid", own)
            if s.name == "seednet_model_info" and s.value:
                found.setdefault(pid, {})["version"] = s.labels["version"]
            elif s.name == "seednet_rollout_info" and s.value:
                found.setdefault(pid, {})["rollout"] = {
                    k: s.labels[k] for k in ("rollout", "candidate", "step", "state")
                }
            elif s.name == "seednet_rollout_revision":
                found.setdefault(pid, {})["revision"] = int(s.value)
        return [
            {"pid": int(pid), "version": w.get("version"), "rollout": w.get("rollout"),
             "revision": w.get("revision", 0)}
            for pid, w in sorted(found.items(), key=lambda kv: int(kv[0]))
            if "version" in w and _alive(int(pid))
        ]  # fmt: skip

    def _view(self):
        path = multiprocess_dir()
        if path is None:
            return self.registry
        merged = CollectorRegistry()  # every worker's files, summed
        multiprocess.MultiProcessCollector(merged, path=path)
        return merged

    def render(self) -> bytes:
        return generate_latest(_ServingOnly(self._view()))

    @staticmethod
    def worker_exited(pid: int) -> None:
        """Drop a finished worker's live gauges (multiprocess mode only)."""
        if multiprocess_dir() is not None:
            multiprocess.mark_process_dead(pid)


def _set_only(gauge: Gauge, names: tuple[str, ...], labels: dict[str, str] | None) -> None:
    """Set the series of ``labels`` to 1 and every other series of ``gauge`` to 0.

    In multiprocess mode a series, once written, stays in this worker's file: clear()
    forgets it here only. The old series are zeroed instead, and render() drops them.
    """
    for sample in gauge.collect()[0].samples:
        old = {k: sample.labels[k] for k in names}
        if old != labels and sample.value:
            gauge.labels(**old).set(0)
    if labels is not None:
        gauge.labels(**labels).set(1)


def _alive(pid: int) -> bool:
    """Whether a worker process still runs (one killed outright leaves its files behind)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
