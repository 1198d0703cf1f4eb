"""Dynamic batching on the model thread.

``Batcher`` merges concurrent requests into one forward pass (up to ``max_batch_size``
images or ``max_wait`` seconds) and runs it on a single worker thread, so the event loop
never blocks on the model and nothing else uses the device at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from service.backends import Outputs

if TYPE_CHECKING:
    from service.serving import ServingModel

T = TypeVar("T")


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
    ) -> None:
        self.get_model = get_model
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait
        self.enabled = enabled
        self.stats = stats or BatchStats()
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

    async def submit(self, images: np.ndarray) -> tuple[Outputs, ServingModel]:
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
        results = await asyncio.gather(*(p.future for p in pending))
        model = results[0][1]
        probs = np.concatenate([r[0][0] for r in results])
        att = np.concatenate([r[0][1] for r in results])
        return (probs, att), model

    async def _worker(self) -> None:
        while True:
            first = await self.queue.get()
            batch = [first]
            size = len(first.images)
            if self.enabled:
                deadline = time.perf_counter() + self.max_wait
                while size < self.max_batch_size:
                    try:
                        nxt = self.queue.get_nowait()
                    except asyncio.QueueEmpty:
                        remaining = deadline - time.perf_counter()
                        if remaining <= 0:
                            break
                        try:
                            nxt = await asyncio.wait_for(self.queue.get(), remaining)
                        except asyncio.TimeoutError:
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
        images = np.concatenate([p.images for p in batch]) if len(batch) > 1 else batch[0].images
        t0 = time.perf_counter()
        try:
            model = self.get_model()  # the model at the moment the batch runs (swap-safe)
            probs, att = await self.run_in_model_thread(model.backend.run, images, kind="batch")
        except Exception as exc:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        self.stats.on_batch(len(images), time.perf_counter() - t0)
        offset = 0
        for p in batch:
            n = len(p.images)
            if not p.future.done():  # a cancelled request simply drops its rows
                p.future.set_result(((probs[offset : offset + n], att[offset : offset + n]), model))
            offset += n
