"""Dynamic batching on the model thread, with admission control.

``Batcher`` merges concurrent requests into one forward pass (up to ``max_batch_size``
images or ``max_wait`` seconds) and runs it on a single worker thread, so the event loop
never blocks on the model and nothing else uses the device at the same time.

Admission control, as Triton and TorchServe users expect: at most ``max_queue_images``
images wait; a request that would go over is refused at once (:class:`Overloaded`, 429)
rather than queued for seconds, and a request that waited ``queue_timeout`` seconds
without being served is answered (:class:`DeadlineExceeded`, 503) and never computed.
Both say when to retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from service.dataplane.backends import Outputs

if TYPE_CHECKING:
    from service.lifecycle.prepare import ServingModel

T = TypeVar("T")


class Overloaded(RuntimeError):
    """The queue is full: the request is refused before it waits."""

    code = "overloaded"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(Overloaded):
    """The request waited longer than the queue timeout; it was not computed."""

    code = "deadline_exceeded"


@dataclass
class _Pending:
    images: np.ndarray
    future: asyncio.Future
    enqueued: float


@dataclass
class BatchStats:
    """Callbacks the metrics module hooks into (kept here as plain callables).

    ``on_span(kind, start, end)`` reports every stretch of model-thread work ("batch",
    "load"), measured on that thread: what shows that a load never overlaps a batch.
    """

    on_batch: Callable[[int, float], None] = lambda size, seconds: None
    on_wait: Callable[[float], None] = lambda seconds: None
    on_span: Callable[[str, float, float], None] = lambda kind, start, end: None
    on_queue: Callable[[int], None] = lambda images: None
    on_reject: Callable[[str], None] = lambda reason: None


class Batcher:
    """Dynamic batching on one worker thread.

    ``submit`` splits a request into chunks of at most ``max_batch_size`` images; the
    worker takes the first waiting chunk, then keeps adding chunks until the batch is
    full or ``max_wait`` has passed, runs one forward pass, and hands every request
    exactly its own rows. With batching off, each chunk runs on its own.
    """

    def __init__(
        self,
        get_model: Callable[[], ServingModel],
        max_batch_size: int,
        max_wait: float,
        enabled: bool = True,
        stats: BatchStats | None = None,
        max_queue_images: int | None = None,
        queue_timeout: float | None = None,
    ) -> None:
        self.get_model = get_model
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait
        self.enabled = enabled
        self.stats = stats or BatchStats()
        self.max_queue_images = max_queue_images
        self.queue_timeout = queue_timeout
        self.queued_images = 0
        self._seconds_per_image = 0.0  # moving average, for Retry-After
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seednet-model")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=True)

    async def run_in_model_thread(self, fn: Callable[..., T], *args, kind: str = "load") -> T:
        """Run ``fn`` on the model thread, the only thread that touches the device.

        Batches run there too, one at a time, so a model load, warm-up or CUDA-graph
        capture submitted here never overlaps a forward pass.
        """
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, self._timed, kind, fn, *args
        )

    def _timed(self, kind: str, fn: Callable[..., T], *args) -> T:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.stats.on_span(kind, start, time.perf_counter())

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained (at least 1)."""
        return max(1, math.ceil(self.queued_images * self._seconds_per_image))

    def _dequeued(self, p: _Pending) -> None:
        self.queued_images -= len(p.images)
        self.stats.on_queue(self.queued_images)

    async def submit(self, images: np.ndarray) -> tuple[Outputs, ServingModel]:
        """Rows of ``images`` through the model; Overloaded / DeadlineExceeded when refused."""
        limit = self.max_queue_images
        if limit is not None and self.queued_images + len(images) > limit:
            self.stats.on_reject("queue_full")
            raise Overloaded(
                f"the server is at capacity: {self.queued_images} images are waiting "
                f"(limit {limit}); retry shortly",
                self.retry_after(),
            )
        loop = asyncio.get_running_loop()
        pending = []
        for start in range(0, len(images), self.max_batch_size):
            p = _Pending(
                images[start : start + self.max_batch_size],
                loop.create_future(),
                time.perf_counter(),
            )
            pending.append(p)
            self.queue.put_nowait(p)
            self.queued_images += len(p.images)
        self.stats.on_queue(self.queued_images)
        waiting = asyncio.gather(*(p.future for p in pending))
        try:
            results = await asyncio.wait_for(waiting, self.queue_timeout)
        except asyncio.TimeoutError:
            # the futures are cancelled: the worker drops chunks it has not started yet
            self.stats.on_reject("deadline")
            raise DeadlineExceeded(
                f"the request waited {self.queue_timeout:.3g} s without being served "
                "(SEEDNET_QUEUE_TIMEOUT_MS); retry shortly",
                self.retry_after(),
            ) from None
        model = results[0][1]
        probs = np.concatenate([r[0][0] for r in results])
        att = np.concatenate([r[0][1] for r in results])
        return (probs, att), model

    async def _next(self, timeout: float | None = None) -> _Pending | None:
        """The next chunk still wanted (cancelled ones are dropped), or None on timeout."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while True:
            if deadline is None:
                p = await self.queue.get()
            else:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    return None
                try:
                    p = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    try:
                        p = await asyncio.wait_for(self.queue.get(), remaining)
                    except asyncio.TimeoutError:
                        return None
            self._dequeued(p)
            if not p.future.done():
                return p

    async def _worker(self) -> None:
        while True:
            first = await self._next()
            assert first is not None
            batch = [first]
            size = len(first.images)
            if self.enabled:
                deadline = time.perf_counter() + self.max_wait
                while size < self.max_batch_size:
                    nxt = await self._next(deadline - time.perf_counter())
                    if nxt is None:
                        break
                    if size + len(nxt.images) > self.max_batch_size:
                        # does not fit: it leads the next batch instead
                        await self._run([*batch])
                        batch, size = [nxt], len(nxt.images)
                        deadline = time.perf_counter() + self.max_wait
                        continue
                    batch.append(nxt)
                    size += len(nxt.images)
            await self._run(batch)

    async def _run(self, batch: list[_Pending]) -> None:
        now = time.perf_counter()
        for p in batch:
            self.stats.on_wait(now - p.enqueued)
        t0 = time.perf_counter()
        try:
            model = self.get_model()  # the model at the moment the batch runs (swap-safe)
            live, outputs = await self.run_in_model_thread(
                self._forward, batch, model, kind="batch"
            )
        except Exception as exc:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        if outputs is None:
            return
        probs, att = outputs
        n_images = len(probs)
        seconds = time.perf_counter() - t0
        self.stats.on_batch(n_images, seconds)
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * seconds / n_images
        offset = 0
        for p in live:
            n = len(p.images)
            if not p.future.done():  # a request that timed out meanwhile drops its rows
                p.future.set_result(((probs[offset : offset + n], att[offset : offset + n]), model))
            offset += n

    @staticmethod
    def _forward(
        batch: list[_Pending], model: ServingModel
    ) -> tuple[list[_Pending], Outputs | None]:
        """On the model thread: drop requests that gave up while the batch waited for the
        thread (reading ``done()`` across threads is a benign race: at worst one more row
        is computed), then run the rest as one forward pass."""
        live = [p for p in batch if not p.future.done()]
        if not live:
            return live, None
        images = np.concatenate([p.images for p in live]) if len(live) > 1 else live[0].images
        return live, model.backend.run(images)
