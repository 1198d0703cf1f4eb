"""Explanations: Grad-CAM and per-branch maps of the served version, beside the data plane.

What every front end calls for an explanation (``POST /explain``, the inference
protocol's ``explain`` outputs over REST and gRPC)::

    files  -> the data plane's decode pool (same limits, errors, budget) --+
    pixels ----------------------------------------------------------------+-> explain queue
        -> the explanation worker process (explain_worker.py) -> maps (arrays or JSON)

Explanations never touch the batcher or the model thread: they need gradients through
the eager model, which the worker process holds (one per served version, built when the
version starts serving, see :meth:`Explanations.model_changed`). Their own limits:

- one request at a time in the worker, first come first served;
- at most ``queue`` requests waiting: one more gets 429 with ``Retry-After`` (the mean
  time of an explanation times the requests ahead) at once;
- a request must be answered within ``timeout`` seconds of arriving at the queue: one
  still waiting then gets 503 with ``Retry-After`` and is never computed; one already
  running finishes in the worker, its answer dropped;
- a worker that dies (killed for memory, say) fails the request it ran with 503 and is
  started again for the next one.

Metrics: ``seednet_explanations_total{outcome}``, ``seednet_explain_queue`` (waiting),
``seednet_explain_running``, ``seednet_explain_queue_wait_seconds``, ``seednet_explain_seconds``,
``seednet_explained_images_total``; requests are counted per route by the front ends as
any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from service.dataplane import explain_worker as worker
from service.dataplane.explain_worker import ExplainJob, JobResult, VersionKey, WireOptions
from service.dataplane.images import ImageFile, PreparedImage
from service.dataplane.inference import PIXEL_SHAPE, DataPlane
from service.dataplane.served import ServingModel
from service.errors import (
    BadRequest,
    ExplainArgumentError,
    ExplainerUnavailable,
    ExplainQueueFull,
    ExplainTimeout,
    ExplanationsOff,
)
from service.metrics import Metrics

log = logging.getLogger("seednet.explain")

#: torch threads of the worker, and how much lower its CPU priority is (nice).
WORKER_THREADS = 1
WORKER_NICE = 10
#: The first guess of an explanation's time (seconds), before any was measured.
FIRST_GUESS_SECONDS = 1.0

__all__ = [
    "ExplainRunner",
    "Explanation",
    "Explanations",
    "WireOptions",
    "parse_blocks",
    "parse_target",
]


# --------------------------------------------------------------------- arguments


def parse_target(value: str | int | None, class_names: Sequence[str]) -> int | None:
    """A class given by label (``cat``) or index (``3``) -> its index; None: the predicted
    class of each image. :class:`ExplainArgumentError` for anything else."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ExplainArgumentError(f"class must be a label or an index, got {value!r}")
    if isinstance(value, (int, np.integer)):
        index = int(value)
    elif isinstance(value, str) and value.strip() in class_names:
        return list(class_names).index(value.strip())
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        index = int(value.strip())
    else:
        raise ExplainArgumentError(
            f"unknown class {str(value)[:64]!r}: give a label ({', '.join(class_names)}) "
            f"or an index from 0 to {len(class_names) - 1}"
        )
    if not 0 <= index < len(class_names):
        raise ExplainArgumentError(
            f"class {index} is out of range: this model has classes 0 to {len(class_names) - 1}"
        )
    return index


def parse_blocks(
    value: str | int | Sequence[str | int] | None, num_blocks: int
) -> tuple[int, ...] | None:
    """Block numbers: ``"6,7"``, ``7``, ``["6", "7"]`` or ``"all"`` -> sorted unique
    numbers (None for every block). :class:`ExplainArgumentError` for anything else."""
    if value is None:
        return None
    items: list[str | int] = []
    for part in [value] if isinstance(value, (str, int)) else list(value):
        if isinstance(part, str):
            items += [p.strip() for p in part.split(",") if p.strip()]
        else:
            items.append(part)
    if [str(i).lower() for i in items] == ["all"]:
        return None
    if not items:
        raise ExplainArgumentError("blocks is empty: name at least one block, or 'all'")
    chosen = set()
    for item in items:
        if isinstance(item, bool) or not (
            isinstance(item, (int, np.integer)) or (isinstance(item, str) and item.isdigit())
        ):
            raise ExplainArgumentError(
                f"blocks must be block numbers separated by commas (e.g. 6,7), "
                f"got {str(item)[:64]!r}"
            )
        number = int(item)
        if not 1 <= number <= num_blocks:
            raise ExplainArgumentError(
                f"block {number} is out of range: this model has blocks 1 to {num_blocks}"
            )
        chosen.add(number)
    return tuple(sorted(chosen))


def version_key(root: str, model: ServingModel) -> VersionKey:
    return VersionKey(root, model.version.name, model.version.version)


# ------------------------------------------------------------------------ the runner


class ExplainRunner:
    """The explanation worker process and the bounded queue in front of it (see the
    module docstring). Create it in the event loop that calls it."""

    def __init__(self, metrics: Metrics, *, queue: int, timeout: float) -> None:
        self.metrics = metrics
        self.queue = queue
        self.timeout = timeout
        self._executor: ProcessPoolExecutor | None = None
        self._turn = asyncio.Lock()  # FIFO: the worker runs one request at a time
        self._waiting = 0
        self._mean_seconds = FIRST_GUESS_SECONDS
        self._tasks: set[asyncio.Task] = set()

    @property
    def started(self) -> bool:
        return self._executor is not None

    @property
    def waiting(self) -> int:
        return self._waiting

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=worker.initialize,
                initargs=(WORKER_THREADS, WORKER_NICE),
            )
        return self._executor

    def _restart(self, broken: ProcessPoolExecutor) -> None:
        if self._executor is broken:
            self._executor = None
            broken.shutdown(wait=False, cancel_futures=True)

    def _submit(self, fn: Callable, arg: object) -> tuple[ProcessPoolExecutor, Future]:
        pool = self._pool()
        try:
            return pool, pool.submit(fn, arg)
        except BrokenProcessPool:  # it died while idle: start a new one
            self._restart(pool)
            pool = self._pool()
            return pool, pool.submit(fn, arg)

    def retry_after(self, ahead: int) -> int:
        """Seconds until ``ahead`` requests are done, at the mean measured time."""
        return max(1, math.ceil(ahead * self._mean_seconds))

    def _note_seconds(self, seconds: float) -> None:
        self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * seconds

    def prepare(self, key: VersionKey) -> None:
        """Build ``key``'s explainer in the worker (starting it if needed), in the queue's
        order: requests that arrive after this are explained by the new version."""
        task = asyncio.get_running_loop().create_task(self._prepare(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _prepare(self, key: VersionKey) -> None:
        try:
            result = await self._run(worker.prepare, key, deadline=None)
        except Exception as exc:  # the next request builds it again, and says why
            log.warning("explanations: preparing %s failed: %s", key.ref, exc)
            return
        if result.error is not None:
            log.warning(
                "explanations: cannot build the explainer of %s: %s", key.ref, result.error[1]
            )
        else:
            log.info("explanations: %s ready in %.1fs", key.ref, result.seconds)

    def admit(self) -> None:
        """429 at once when the queue is full (front ends call it before reading a body)."""
        if self._turn.locked() and self._waiting >= self.queue:
            self.metrics.explanations.labels("queue_full").inc()
            raise ExplainQueueFull(
                f"the explanation queue is full ({self._waiting} requests waiting); "
                "predictions are not affected",
                retry_after=self.retry_after(self._waiting + 1),
            )

    async def explain(self, job: ExplainJob) -> JobResult:
        """``job`` through the queue and the worker; the service's errors when refused."""
        self.admit()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            result = await self._run(worker.run, job, deadline=deadline)
        except ExplainTimeout:
            self.metrics.explanations.labels("timeout").inc()
            raise
        except ExplainerUnavailable:
            self.metrics.explanations.labels("failed").inc()
            raise
        if result.error is not None:
            kind, message = result.error
            if kind == "invalid":
                self.metrics.explanations.labels("invalid").inc()
                raise ExplainArgumentError(message)
            self.metrics.explanations.labels("failed").inc()
            raise ExplainerUnavailable(
                f"the explanation of {job.key.ref} failed: {message}", retry_after=1
            )
        self._note_seconds(result.seconds)
        self.metrics.explanations.labels("done").inc()
        self.metrics.explain_seconds.observe(result.seconds)
        self.metrics.explain_images.inc(len(job.pixels))
        return result

    async def _run(self, fn: Callable, arg: object, deadline: float | None) -> JobResult:
        loop = asyncio.get_running_loop()
        counted = deadline is not None  # requests count in the queue, preparations do not
        t0 = time.perf_counter()
        if counted:
            self._waiting += 1
            self.metrics.explain_queue.set(self._waiting)
        try:
            async with asyncio.timeout_at(deadline):
                await self._turn.acquire()
        except TimeoutError:
            raise ExplainTimeout(
                f"the explanation waited {self.timeout:g} s for the explanation worker and "
                "was not computed (SEEDNET_EXPLAIN_TIMEOUT_S)",
                retry_after=self.retry_after(self._waiting),
            ) from None
        finally:
            if counted:
                self._waiting -= 1
                self.metrics.explain_queue.set(self._waiting)
        if counted:
            self.metrics.explain_queue_wait.observe(time.perf_counter() - t0)
        try:
            pool, future = self._submit(fn, arg)
        except Exception as exc:
            self._turn.release()
            log.warning("explanations: the worker process cannot start (%r)", exc)
            raise ExplainerUnavailable(
                "the explanation worker cannot be started", retry_after=self.retry_after(1)
            ) from None
        except BaseException:
            self._turn.release()
            raise

        if counted:
            self.metrics.explain_running.inc()

        def done() -> None:
            if counted:
                self.metrics.explain_running.dec()
            self._turn.release()

        def pass_turn(_: Future) -> None:
            # The turn passes on when the worker is done, even if this request has gone.
            # (a closed loop: the service has stopped)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(done)

        future.add_done_callback(pass_turn)
        answer = asyncio.wrap_future(future)
        # (read even when nobody waits for it any more: no "exception never retrieved")
        answer.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(answer)
        except TimeoutError:
            raise ExplainTimeout(
                f"the explanation was not done within {self.timeout:g} s "
                "(SEEDNET_EXPLAIN_TIMEOUT_S)",
                retry_after=self.retry_after(self._waiting + 1),
            ) from None
        except BrokenProcessPool:
            self._restart(pool)
            log.warning("explanations: the worker process stopped; it is started again")
            raise ExplainerUnavailable(
                "the explanation worker stopped while explaining; it is being restarted",
                retry_after=self.retry_after(1),
            ) from None
        except Exception as exc:  # the worker's functions return errors: it failed to start
            self._restart(pool)
            log.warning("explanations: the worker process failed (%r); it is started again", exc)
            raise ExplainerUnavailable(
                "the explanation worker failed; it is being restarted",
                retry_after=self.retry_after(1),
            ) from None

    async def close(self) -> None:
        """Stop the worker: nothing new starts, a running explanation ends first (an
        explanation takes seconds at most), then the process exits."""
        for task in self._tasks:
            task.cancel()
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)


# ------------------------------------------------------------------- the front door


@dataclass(frozen=True)
class Explanation:
    """One request's explanation: what the worker sent, the model version it explains,
    and the decoded images (files only)."""

    result: JobResult
    model: ServingModel
    images: list[PreparedImage] | None = None


class Explanations:
    """What the front ends call (see the module docstring). ``runner`` None: off."""

    def __init__(
        self,
        plane: DataPlane,
        runner: ExplainRunner | None,
        registry_root: str,
        *,
        eager: bool = True,
    ) -> None:
        self.plane = plane
        self.runner = runner
        self.registry_root = registry_root
        self.eager = eager

    @property
    def enabled(self) -> bool:
        return self.runner is not None

    def check_enabled(self) -> ExplainRunner:
        if self.runner is None:
            raise ExplanationsOff()
        return self.runner

    def admit(self) -> None:
        """404 when off, 429 when the queue is full: before a front end reads a body."""
        self.check_enabled().admit()

    def model_changed(self, model: ServingModel) -> None:
        """A version starts serving: build its explainer now (``eager``), or once the
        worker has been started by a first explanation."""
        if self.runner is not None and (self.eager or self.runner.started):
            self.runner.prepare(version_key(self.registry_root, model))

    async def explain(
        self,
        *,
        protocol: str,
        files: Sequence[ImageFile] | None = None,
        pixels: np.ndarray | None = None,
        target: int | None = None,
        blocks: tuple[int, ...] | None = None,
        macro: bool = True,
        wire: WireOptions | None = None,
        model: ServingModel | None = None,
    ) -> Explanation:
        """Maps for ``files`` (decoded as ``/predict`` decodes uploads) or ``pixels``
        (uint8 ``[N, 3, 32, 32]``), by the version ``model`` (None: the one serving now).
        ``target`` and ``blocks`` as :func:`parse_target` and :func:`parse_blocks` give them."""
        runner = self.check_enabled()
        if (files is None) == (pixels is None):
            raise ValueError("give exactly one of files, pixels")
        model = model or self.plane.current_model()
        images = None
        if files is not None:
            images = await self.plane.decode(files, protocol)
            pixels = np.stack([p.array for p in images])
        assert pixels is not None
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != PIXEL_SHAPE:
            raise BadRequest(
                f"pixels must be uint8 [N, {', '.join(map(str, PIXEL_SHAPE))}], "
                f"got {pixels.dtype} {list(pixels.shape)}"
            )
        job = ExplainJob(
            key=version_key(self.registry_root, model),
            pixels=np.ascontiguousarray(pixels),
            target=target,
            blocks=blocks,
            macro=macro,
            labels=tuple(model.class_names),
            wire=wire,
        )
        return Explanation(await runner.explain(job), model, images)

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.close()
