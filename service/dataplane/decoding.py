"""Decoding files on a bounded thread pool shared fairly between requests.

Image decoding is the one CPU cost a client controls (a 40 KB PNG can declare 16 million
pixels), so it runs on its own threads, never on the event loop or asyncio's default
pool, under three limits:

- per image: ``ImageLimits.max_pixels`` (header), checked before decoding;
- per request: ``ImageLimits.max_request_pixels``, the sum of the pixels every image of
  the request will decode to, checked after reading all headers and before decoding any
  (413 for the whole request, so nothing is wasted on it);
- per process: at most ``workers`` large decodes at a time plus one small one, so at most
  ``workers x max_pixels + SMALL_JOB_PIXELS`` decoded pixels exist at once, whatever the
  number of requests.

Fairness:

- a request decodes its images one after another, so it holds at most one thread;
- a job is *small* when it reads headers or decodes at most :data:`SMALL_JOB_PIXELS`
  (a CIFAR image, a phone photo in JPEG draft mode). One thread takes small jobs only, so
  small requests never queue behind large decodes; small jobs also go first on the
  others (they take milliseconds);
- among waiting jobs of the same kind, the request that has had the fewest pixels
  decoded so far goes first (ties: first come), so a request of many large images gives
  way to every other request after each image.

Memory: a large decode leaves freed blocks in glibc's malloc arenas, which keep RSS high
after the work is done. When the pool goes idle after decoding more than
:data:`TRIM_AFTER_PIXELS`, it asks glibc to give them back (``malloc_trim``).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import heapq
import itertools
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import TypeVar

from service.dataplane.images import (
    ImageFile,
    ImageLimits,
    OpenedImage,
    PreparedImage,
    decode_opened,
    open_image,
)
from service.errors import ImageError, TooManyPixelsError

log = logging.getLogger("seednet.decoding")
T = TypeVar("T")
SMALL_JOB_PIXELS = 1_000_000
TRIM_AFTER_PIXELS = 4_000_000

_Waiter = tuple[float, int, "asyncio.Future[str]"]


class DecodePool:
    """``workers`` threads for any job plus one for small jobs (see the module docstring)."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError("a decode pool needs at least one worker")
        self.workers = workers
        self._executor = ThreadPoolExecutor(workers + 1, thread_name_prefix="seednet-decode")
        self._free = {"any": workers, "small": 1}
        # waiters by job kind; a future's result says which kind of slot it was given
        self._waiting: dict[bool, list[_Waiter]] = {True: [], False: []}
        self._order = itertools.count()
        self._pixels_since_trim = 0

    @property
    def busy(self) -> int:
        return self.workers + 1 - self._free["any"] - self._free["small"]

    async def run(self, fn: Callable[..., T], *args: object, served: float, pixels: int = 0) -> T:
        """``fn(*args)`` on a decode thread; ``pixels``: what it decodes (0: headers only).

        ``served`` ranks this caller among waiting jobs of its kind (fewest first).
        """
        small = pixels <= SMALL_JOB_PIXELS
        slot = await self._acquire(small, served)
        loop = asyncio.get_running_loop()
        self._pixels_since_trim += pixels
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            self._release(slot)
            raise
        # Released when the thread finishes, even if the awaiting request was cancelled:
        # the thread keeps working until then.
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release, slot))
        return await asyncio.wrap_future(future)

    async def _acquire(self, small: bool, served: float) -> str:
        for slot in ("small", "any") if small else ("any",):
            if self._free[slot] > 0 and not self._queued_for(slot):
                self._free[slot] -= 1
                return slot
        turn: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting[small], (served, next(self._order), turn))
        try:
            return await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release(turn.result())  # the slot arrived as we were cancelled
            else:
                turn.cancel()  # skipped by _release
            raise

    def _queued_for(self, slot: str) -> bool:
        kinds = (True,) if slot == "small" else (True, False)
        return any(not t.done() for kind in kinds for _, _, t in self._waiting[kind])

    def _release(self, slot: str) -> None:
        # Small jobs first on any slot (they are short); the small slot takes no other.
        for kind in (True,) if slot == "small" else (True, False):
            heap = self._waiting[kind]
            while heap:
                _, _, turn = heapq.heappop(heap)
                if not turn.done():
                    turn.set_result(slot)  # the slot goes straight to this waiter
                    return
        self._free[slot] += 1
        self._trim_if_idle()

    def _trim_if_idle(self) -> None:
        if self.busy == 0 and self._pixels_since_trim > TRIM_AFTER_PIXELS:
            self._pixels_since_trim = 0
            self._executor.submit(release_free_memory)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def release_free_memory() -> None:
    """Return freed heap memory to the OS (glibc's ``malloc_trim``; a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_TRIM: list[Callable[[int], int] | None] = []


def _malloc_trim() -> Callable[[int], int] | None:
    if not _TRIM:
        name = ctypes.util.find_library("c")
        try:
            _TRIM.append(getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None)
        except OSError:
            _TRIM.append(None)
    return _TRIM[0]


def _named(exc: ImageError, filename: str | None) -> ImageError:
    # Name the file, so a person sending several knows which one to fix.
    return type(exc)(f"{filename}: {exc.message}") if filename else exc


def _open_all(files: Sequence[ImageFile], limits: ImageLimits, size: int) -> list[OpenedImage]:
    """Every header checked, and the request's budget: nothing decoded yet."""
    opened = []
    for u in files:
        try:
            opened.append(open_image(u.data, limits, size))
        except ImageError as exc:
            raise _named(exc, u.name) from None
    total = sum(o.decode_pixels for o in opened)
    if total > limits.max_request_pixels:
        raise TooManyPixelsError(
            f"the {len(opened)} images decode to {total:,} pixels in all; at most "
            f"{limits.max_request_pixels:,} per request (send fewer or smaller images)"
        )
    return opened


def _decode_one(opened: OpenedImage, filename: str | None, size: int) -> PreparedImage:
    try:
        return decode_opened(opened, size)
    except ImageError as exc:
        raise _named(exc, filename) from None


async def decode_files(
    pool: DecodePool,
    files: Sequence[ImageFile],
    limits: ImageLimits,
    size: int = 32,
    hold: Callable[[int], AbstractContextManager] | None = None,
) -> list[PreparedImage]:
    """Every upload as a model input, within the request's budget, fairly scheduled.

    ``hold(n)`` is entered once every header passed the limits, around the decoding of
    the pixels (admission counts the images from then on; a refused request never)."""
    opened = await pool.run(_open_all, files, limits, size, served=0)
    prepared: list[PreparedImage] = []
    served = 0
    with hold(len(files)) if hold is not None else nullcontext():
        for u, o in zip(files, opened, strict=True):
            prepared.append(
                await pool.run(_decode_one, o, u.name, size, served=served, pixels=o.decode_pixels)
            )
            served += o.decode_pixels
    return prepared
