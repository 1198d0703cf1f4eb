"""Dynamic batching on the model thread, with admission control by deadline.

``Batcher`` runs every forward pass on one worker thread (the model thread), so the event
loop never blocks on the model and nothing else uses the device at the same time.

Batching follows the load: when a request arrives at an empty queue it runs at once (no
waiting for company: one client pays no batching delay); while a batch runs, requests
queue up, and the next batch takes all of them (up to ``max_batch_size`` images), waiting
at most ``max_wait`` for more only when others are already queued. Each batch reports
whether it ran alone ("immediate") or merged ("batched"), so the switch shows in metrics.

Admission control, as Triton and TorchServe users expect, sized from what the model
costs: with a ``queue_timeout``, every request may wait that long, at the door and in the
queue, for its batch to *start* (the time its body takes to arrive and decode does not
count: that work is done by then). Before its body is read, a request waits at the door
(:meth:`Batcher.wait_for_room`: a sleeping coroutine, nothing read or decoded) until it
could start in time, and is refused (:class:`~service.errors.Overloaded`, 429) when it
still cannot by its deadline: closed-loop clients refused at once come straight back, and
hundreds of refusals a second took the event loop's core from the requests being answered.
The door is a line, not a poll: waiters are let in, newest first, when a batch takes
images off the queue (256 waiters polling every 20 ms woke the event loop 12,800 times a
second on the core that parses the requests being answered).
After the door, a request is refused at once (429) when the
images already queued or being decoded, at the measured cost per image, would not let it
start in time,
or when ``max_queue_images`` would be exceeded; a queued request whose deadline passes
before its batch starts is answered (:class:`~service.errors.DeadlineExceeded`, 503) and
never computed. A batch that has started always delivers its answers, so the model's time
is never spent on an answer that is thrown away. Both refusals say when to retry.

A request may pin the model it runs on (a rollout's candidate, say); requests pinned to
different models never share a batch. Unpinned requests run on the model serving when
their batch starts, so a swap never fails a request.

Work that no client waits for (a rollout's shadow traffic, ``service.dataplane.shadow``)
runs only when no request is queued: :class:`IdleWork` is asked for one batch at a time
whenever the queue is empty, so a request waits at most for the one such batch that is
running, and that time is not held against its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np

from service.dataplane.backends import Outputs
from service.dataplane.served import ServingModel
from service.errors import DeadlineExceeded, Overloaded

T = TypeVar("T")

#: How long the current request waited at the door: it counts against its deadline (the
#: time its body takes to arrive and decode does not: that work is done by then).
WAITED: ContextVar[float] = ContextVar("seednet_door_wait", default=0.0)


@dataclass(eq=False)
class _Waiter:
    """A request at the door: ``n`` images, arrived at ``arrived`` (perf_counter)."""

    n: int
    arrived: float
    future: asyncio.Future


@dataclass(eq=False)  # identity: deque.remove must never compare the images
class _Chunk:
    """At most ``max_batch_size`` images of one request, waiting for a batch."""

    images: np.ndarray
    future: asyncio.Future
    enqueued: float
    deadline: float | None  # perf_counter time by which its batch must start
    model: ServingModel | None  # pinned model, or None: whatever serves when it runs
    paused_before: float = 0.0  # the batcher's paused seconds when it was queued
    started: float = 0.0
    computing: bool = False  # set on the model thread when its forward pass begins
    seconds: float = 0.0  # the forward pass that computed it
    outputs: Outputs = field(default_factory=dict)  # its rows, once computed


@dataclass(frozen=True)
class BatchResult:
    """A request's rows of every output, the model that computed them, and where the
    time went: ``queue_wait`` until its (last) batch started, ``model_seconds`` of the
    forward passes that computed it."""

    outputs: Outputs
    model: ServingModel
    queue_wait: float
    model_seconds: float


@dataclass
class BatchStats:
    """Callbacks the metrics hook into (plain callables: no metrics import here).

    ``on_span(kind, start, end)`` reports every stretch of model-thread work ("batch",
    "load"), measured on that thread: what shows that a load never overlaps a batch.
    """

    on_batch: Callable[[int, float, str], None] = lambda size, seconds, mode: None
    on_span: Callable[[str, float, float], None] = lambda kind, start, end: None
    on_queue: Callable[[int], None] = lambda images: None
    on_running: Callable[[int], None] = lambda images: None
    on_reject: Callable[[str], None] = lambda reason: None


@dataclass
class ServiceRate:
    """Seconds of model time per image at the batch sizes a queue drains with.

    Until a batch of at least a quarter of ``max_batch_size`` has run, the batcher uses
    the model's load-time measurement; then an exponential average over such batches
    (small batches cost more per image and say nothing about how fast a queue drains).
    """

    seconds_per_image: float = 0.0
    samples: int = field(default=0)

    def observe(self, images: int, seconds: float, full: int) -> None:
        if images * 4 < full:
            return
        per_image = seconds / images
        self.seconds_per_image = (
            per_image if not self.samples else 0.8 * self.seconds_per_image + 0.2 * per_image
        )
        self.samples += 1


class IdleWork(Protocol):
    """Background work the batcher runs between requests (see the module docstring)."""

    def pending(self) -> bool: ...

    async def run_one(self) -> None:
        """Run one batch (on the model thread, ``Batcher.run_in_model_thread(kind=...)``)."""


class Batcher:
    """Dynamic batching on one worker thread (see the module docstring)."""

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
        self.max_batch_size = max_batch_size if enabled else 10**9
        self.max_wait = max_wait
        self.enabled = enabled
        self.stats = stats or BatchStats()
        self.max_queue_images = max_queue_images
        self.queue_timeout = queue_timeout
        self.rate = ServiceRate()
        self.queued_images = 0
        # Admitted images still being decoded: they will queue, so they count already
        # (without them, 256 clients had ~2,300 uploads decoded in 15 s and ~700 computed:
        # the rest were refused at the queue after their decode).
        self.preparing_images = 0
        # Model loads run on the model thread too; the time they hold it does not count
        # against a request's deadline (a promote or reload fails no request).
        self._paused = 0.0
        self._pause_started: float | None = None
        self._queue: deque[_Chunk] = deque()
        self._door: deque[_Waiter] = deque()  # requests waiting for room, oldest first
        self._wakeup = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seednet-model")
        self._task: asyncio.Task | None = None
        self.idle_work: IdleWork | None = None

    # -- life ----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="batcher")

    def wake(self) -> None:
        """Idle work was added: look at it if no request is queued."""
        self._wakeup.set()

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
        if kind != "batch":
            self._pause_started = start  # (a float store: safe to read from the loop)
        try:
            return fn(*args)
        finally:
            end = time.perf_counter()
            if kind != "batch":
                self._pause_started = None
                self._paused += end - start
            self.stats.on_span(kind, start, end)

    def _deadline(self, chunk: _Chunk) -> float:
        """A chunk's deadline, moved on by the time loads held the model thread since."""
        assert chunk.deadline is not None
        pause = self._pause_started
        ongoing = time.perf_counter() - pause if pause is not None else 0.0
        return chunk.deadline + (self._paused - chunk.paused_before) + ongoing

    # -- admission -----------------------------------------------------------------------

    def seconds_per_image(self) -> float:
        """The measured cost, else the one the serving model was loaded with."""
        if self.rate.samples:
            return self.rate.seconds_per_image
        try:
            return self.get_model().seconds_per_image
        except Exception:  # no model yet: nothing to estimate with
            return 0.0

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained (at least 1)."""
        return max(1, math.ceil(self.images_ahead() * self.seconds_per_image()))

    def images_ahead(self) -> int:
        """Images a request queued now would wait for: queued, and being decoded."""
        return self.queued_images + self.preparing_images

    def _budget(self, waited: float | None = None) -> float:
        """What is left of the current request's queue timeout after its wait at the door."""
        assert self.queue_timeout is not None
        return self.queue_timeout - (WAITED.get() if waited is None else waited)

    def _fits(self, n: int, waited: float) -> bool:
        if self.queue_timeout is None:
            return True
        return self.images_ahead() * self.seconds_per_image() <= self._budget(waited)

    async def wait_for_room(self, n: int = 1) -> None:
        """Admission at the door (before a body is read): wait until ``n`` images could
        start within the request's deadline; :class:`Overloaded` when they still cannot
        by then, or at once when ``max_queue_images`` is reached."""
        arrived = time.perf_counter()
        # (with an explicit max_queue_images a refusal is immediate, as documented; a
        # newcomer queues behind those already waiting, even if it would fit now)
        if (
            self.queue_timeout is not None
            and self.max_queue_images is None
            and (self._door or not self._fits(n, 0.0))
        ):
            waiter = _Waiter(n, arrived, asyncio.get_running_loop().create_future())
            self._door.append(waiter)
            try:
                await asyncio.wait_for(waiter.future, self._budget(0.0))
            except asyncio.TimeoutError:
                pass  # admit() below refuses it, unless room came at the last moment
            finally:
                if waiter.future.cancelled() or not waiter.future.done():
                    # timed out, or its client left: off the line now, or later arrivals
                    # would queue behind it at an idle server, with no batch to let them in
                    waiter.future.cancel()
                    with contextlib.suppress(ValueError):  # (already dropped)
                        self._door.remove(waiter)
        WAITED.set(time.perf_counter() - arrived)
        self.admit(n)

    def _room_changed(self) -> None:
        """Let in the waiters at the door that can now start within their deadline,
        newest first. Those let in count as ahead of the next until they reach the queue
        (their bodies are read meanwhile), so one drained batch does not let in a crowd.

        Newest first because the door has waiters only when the service is overloaded:
        then the same number of requests goes in either way, and letting in those with
        the most deadline left answers them soon, while the oldest are refused (429) at
        their deadline; oldest first would serve every request late (adaptive LIFO)."""
        if not self._door:
            return
        now, letting_in = time.perf_counter(), 0
        spi = self.seconds_per_image()
        waiting: deque[_Waiter] = deque()
        for waiter in reversed(self._door):
            if waiter.future.done():  # leaving (timed out, or its client left)
                continue
            if (self.images_ahead() + letting_in) * spi <= self._budget(now - waiter.arrived):
                waiter.future.set_result(None)
                letting_in += waiter.n
            else:
                waiting.appendleft(waiter)
        self._door = waiting

    def admit(self, n: int) -> None:
        """Raise :class:`Overloaded` when ``n`` more images cannot start in time."""
        limit = self.max_queue_images
        if limit is not None and self.images_ahead() + n > limit:
            self.stats.on_reject("queue_full")
            raise Overloaded(
                f"the server is at capacity: {self.images_ahead()} images are waiting "
                f"(limit {limit}); retry shortly",
                retry_after=self.retry_after(),
            )
        if self.queue_timeout is None:
            return
        # The images ahead must be computed before this request's batch can start.
        wait = self.images_ahead() * self.seconds_per_image()
        if wait > self._budget():
            self.stats.on_reject("queue_full")
            raise Overloaded(
                f"the server is at capacity: the {self.images_ahead()} images ahead take "
                f"about {wait:.2f} s, more than the {self.queue_timeout:.3g} s a request may "
                "wait (SEEDNET_QUEUE_TIMEOUT_MS); retry shortly",
                retry_after=self.retry_after(),
            )

    @contextlib.contextmanager
    def preparing(self, n: int) -> Iterator[None]:
        """Admit ``n`` images before they are decoded, and count them as ahead of later
        requests until they are submitted (or fail)."""
        self.admit(n)
        self.preparing_images += n
        try:
            yield
        except BaseException:
            self.preparing_images -= n
            self._room_changed()  # they will not queue after all
            raise
        self.preparing_images -= n  # (submitted next, with no await between: no gap)

    # -- requests ------------------------------------------------------------------------

    async def submit(self, images: np.ndarray, model: ServingModel | None = None) -> BatchResult:
        """Rows of ``images`` through the model (``model``: pin one; None: the serving one).

        Raises Overloaded / DeadlineExceeded when admission control refuses it.
        """
        self.admit(len(images))
        if model is None and len(images) > self.max_batch_size:
            model = self.get_model()  # every chunk of one request on the same model
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        deadline = None if self.queue_timeout is None else now + self._budget()
        chunks = [
            _Chunk(
                images[i : i + self.max_batch_size],
                loop.create_future(),
                now,
                deadline,
                model,
                self._paused,
            )
            for i in range(0, len(images), self.max_batch_size)
        ]
        self._queue.extend(chunks)
        self.queued_images += len(images)
        self.stats.on_queue(self.queued_images)
        self._wakeup.set()
        waiting = asyncio.gather(*(c.future for c in chunks))
        try:
            if deadline is None:
                await waiting
            else:
                await self._until_started(waiting, chunks)
        finally:
            for c in chunks:  # one chunk failed or the caller left: drop the rest unrun
                c.future.cancel()
            # (its outcome is known here; retrieving it keeps asyncio from warning)
            waiting.add_done_callback(lambda f: f.cancelled() or f.exception())
        served_by = chunks[0].future.result()
        if len(chunks) == 1:
            outputs = chunks[0].outputs
        else:
            outputs = {k: np.concatenate([c.outputs[k] for c in chunks]) for k in chunks[0].outputs}
        return BatchResult(
            outputs=outputs,
            model=served_by,
            queue_wait=max(c.started - c.enqueued for c in chunks),
            model_seconds=sum(c.seconds for c in chunks),
        )

    async def _until_started(self, waiting: asyncio.Future, chunks: list[_Chunk]) -> None:
        """Wait for the answers; past the deadline, refuse the request unless every chunk's
        forward pass has begun (then its answer is on its way: wait for it)."""
        while (remaining := self._deadline(chunks[0]) - time.perf_counter()) > 0:
            try:
                await asyncio.wait_for(asyncio.shield(waiting), remaining)
                return
            except asyncio.TimeoutError:
                continue  # a load may have held the model thread meanwhile: look again
        if all(c.computing or c.future.done() for c in chunks):
            await waiting
            return
        self.stats.on_reject("deadline")
        waited = time.perf_counter() - chunks[0].enqueued
        raise DeadlineExceeded(
            f"the request waited {waited:.3g} s without being served (limit "
            f"{self.queue_timeout:.3g} s, SEEDNET_QUEUE_TIMEOUT_MS); it was not computed; "
            "retry shortly",
            retry_after=self.retry_after(),
        )

    # -- the worker ----------------------------------------------------------------------

    def _take(self, model: ServingModel | None, room: int) -> _Chunk | None:
        """The first queued chunk for ``model`` that fits in ``room`` images (None: the
        first chunk at all); chunks whose caller left are dropped, expired ones refused."""
        now = time.perf_counter()
        for chunk in list(self._queue):
            if chunk.future.done():  # cancelled: its request failed or the client left
                self._remove(chunk)
                continue
            if chunk.deadline is not None and now > self._deadline(chunk):
                # its request is being refused (submit's side of the deadline): skip it
                self._remove(chunk)
                continue
            if model is not None and (chunk.model or self.get_model()) is not model:
                continue
            if len(chunk.images) > room:
                return None  # keeps its place: it leads the next batch
            self._remove(chunk)
            return chunk
        return None

    def _remove(self, chunk: _Chunk) -> None:
        self._queue.remove(chunk)
        self.queued_images -= len(chunk.images)

    async def _worker(self) -> None:
        while True:
            if not self._queue:
                if self.idle_work is not None and self.idle_work.pending():
                    with contextlib.suppress(Exception):  # it reports its own failures
                        await self.idle_work.run_one()
                    continue
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            first = self._take(None, self.max_batch_size)
            if first is None:
                self.stats.on_queue(self.queued_images)
                continue
            model = first.model or self.get_model()
            batch, size = [first], len(first.images)
            mode = "immediate"
            if self.enabled and self._queue:  # others are waiting: merge them
                mode = "batched"
                deadline = time.perf_counter() + self.max_wait
                while size < self.max_batch_size:
                    chunk = self._take(model, self.max_batch_size - size)
                    if chunk is None:
                        # What is queued cannot join (another model, or too many images):
                        # waiting would only delay this batch.
                        remaining = deadline - time.perf_counter()
                        if remaining <= 0 or self._queue:
                            break
                        self._wakeup.clear()
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(self._wakeup.wait(), remaining)
                        continue
                    batch.append(chunk)
                    size += len(chunk.images)
            self.stats.on_queue(self.queued_images)
            self._room_changed()  # the batch took its images off the queue
            await self._run(batch, model, mode)

    async def _run(self, batch: list[_Chunk], model: ServingModel, mode: str) -> None:
        start = time.perf_counter()
        for c in batch:
            c.started = start
        self.stats.on_running(sum(len(c.images) for c in batch))
        try:
            live, outputs = await self.run_in_model_thread(
                self._forward, batch, model, kind="batch"
            )
        except Exception as exc:
            self.stats.on_running(0)
            for c in batch:
                if not c.future.done():
                    c.future.set_exception(exc)
            return
        self.stats.on_running(0)
        if outputs is None:
            return
        n_images = sum(len(c.images) for c in live)
        seconds = time.perf_counter() - start
        self.stats.on_batch(n_images, seconds, mode)
        self.rate.observe(n_images, seconds, self.max_batch_size)
        offset = 0
        for c in live:
            n = len(c.images)
            c.outputs = {k: v[offset : offset + n] for k, v in outputs.items()}
            c.seconds = seconds
            if not c.future.done():  # its request gave up meanwhile: the rows are dropped
                c.future.set_result(model)
            offset += n

    @staticmethod
    def _forward(batch: list[_Chunk], model: ServingModel) -> tuple[list[_Chunk], Outputs | None]:
        """On the model thread: drop chunks whose request gave up while the batch waited
        for the thread (reading ``done()`` across threads is a benign race: at worst one
        more row is computed), then run the rest as one forward pass."""
        live = [c for c in batch if not c.future.done()]
        for c in live:
            c.computing = True
        if not live:
            return live, None
        images = np.concatenate([c.images for c in live]) if len(live) > 1 else live[0].images
        return live, model.backend.run(images)
