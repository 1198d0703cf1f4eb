"""Shadow traffic: a share of the requests stable answered, run again on a rollout's
candidate, off the request path, and compared.

The client has its answer before its images are offered here. The lane is bounded
(``SEEDNET_SHADOW_QUEUE_IMAGES``): an offer that does not fit is dropped and counted
(``seednet_shadow_dropped_total``), never waited for. The batcher runs the lane only
while no request is queued (:class:`service.dataplane.batching.IdleWork`), one batch of
up to ``max_batch_size`` images at a time, so live traffic keeps the model thread first
and a client waits at most for the one shadow batch that is running.

Every shadowed image is compared by class name (two versions may name their outputs
differently): top-1 agreement, the (stable label -> candidate label) pairs that differ,
the absolute change of the probability of stable's winning class. The candidate's own
requests, errors, model time and confidence go to the per-version metrics with
``traffic="shadow"``.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from service.dataplane.batching import Batcher
from service.dataplane.served import ServingModel
from service.metrics import Metrics


@dataclass(frozen=True)
class _Job:
    images: np.ndarray
    stable_probabilities: np.ndarray
    stable: ServingModel
    candidate: ServingModel


class ShadowLane:
    """The bounded queue of shadow runs (see the module docstring)."""

    def __init__(self, batcher: Batcher, metrics: Metrics, max_images: int) -> None:
        self.batcher = batcher
        self.metrics = metrics
        self.max_images = max_images
        self.queued_images = 0
        self._jobs: deque[_Job] = deque()

    def offer(
        self,
        images: np.ndarray,
        stable_probabilities: np.ndarray,
        stable: ServingModel,
        candidate: ServingModel,
    ) -> bool:
        """Queue ``images`` for the candidate; False (dropped, counted) when full."""
        if self.queued_images + len(images) > self.max_images:
            self.metrics.shadow_dropped.inc()
            return False
        self._jobs.append(_Job(images, stable_probabilities, stable, candidate))
        self.queued_images += len(images)
        self.batcher.wake()
        return True

    def clear(self) -> None:
        """Forget what is queued (the rollout left its shadow step)."""
        self._jobs.clear()
        self.queued_images = 0

    def pending(self) -> bool:
        return bool(self._jobs)

    async def run_one(self) -> None:
        """One batch of queued jobs for the same candidate, then their comparisons."""
        first = self._jobs.popleft()
        jobs, size = [first], len(first.images)
        while self._jobs and self._jobs[0].candidate is first.candidate:
            n = len(self._jobs[0].images)
            if size + n > self.batcher.max_batch_size:
                break
            jobs.append(self._jobs.popleft())
            size += n
        self.queued_images -= size
        images = np.concatenate([j.images for j in jobs]) if len(jobs) > 1 else first.images
        candidate = first.candidate
        t0 = time.perf_counter()
        try:
            outputs = await self.batcher.run_in_model_thread(
                candidate.backend.run, images, kind="shadow"
            )
            probabilities = np.asarray(outputs["probabilities"])
        except Exception:
            for _ in jobs:
                self.metrics.on_version_error(candidate.info, "shadow")
            return
        seconds = time.perf_counter() - t0
        offset = 0
        for job in jobs:
            rows = probabilities[offset : offset + len(job.images)]
            offset += len(job.images)
            self._compare(job, rows, seconds)

    def _compare(self, job: _Job, candidate: np.ndarray, seconds: float) -> None:
        if not np.isfinite(candidate).all():
            self.metrics.on_version_error(job.candidate.info, "shadow")
            return
        self.metrics.on_version_answer(job.candidate.info, "shadow", candidate, seconds)
        stable_names, candidate_names = job.stable.class_names, job.candidate.class_names
        column = {name: i for i, name in enumerate(candidate_names)}
        pairs, changes = [], []
        stable_top = job.stable_probabilities.argmax(axis=1).tolist()
        candidate_top = candidate.argmax(axis=1).tolist()
        for row, (s, c) in enumerate(zip(stable_top, candidate_top, strict=True)):
            winner = stable_names[s]
            pairs.append((winner, candidate_names[c]))
            j = column.get(winner)
            now = float(candidate[row, j]) if j is not None else 0.0
            changes.append(abs(now - float(job.stable_probabilities[row, s])))
        self.metrics.on_shadow(job.stable.info, job.candidate.info, pairs, changes)
