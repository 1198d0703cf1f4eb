"""The other worker processes of this host (``SEEDNET_WORKERS`` > 1): tell them at once
that the registry changed, and wait until every one of them serves what it now says.

Each worker follows the registry on its own (a conditional read every few seconds); a
worker that changes it (a promote, a rollout started, decided or aborted) also writes a
small file in the folder the workers share (Prometheus' multiprocess folder), and every
worker looks at that file's stamp ten times a second, so its siblings check the registry
within a tenth of a second instead of at their next poll.

What each worker serves is read from the same folder: its ``seednet_model_info`` and
``seednet_rollout_revision`` series (``service.metrics.Metrics.workers``). An admin
call waits until every live worker shows the new state, or says which do not yet.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from service.metrics import Metrics, multiprocess_dir

log = logging.getLogger("seednet.siblings")

SIGNAL_FILE = "seednet-registry-changed"  # not *.db: the metrics collector ignores it
WATCH_SECONDS = 0.1


class Siblings:
    """This host's worker processes (see the module docstring)."""

    def __init__(self, metrics: Metrics, folder: str | None = None) -> None:
        self.metrics = metrics
        folder = folder if folder is not None else multiprocess_dir()
        self.signal_path = Path(folder) / SIGNAL_FILE if folder else None

    def signal(self) -> None:
        """Tell the siblings the registry changed (nothing to do with one worker)."""
        if self.signal_path is None:
            return
        try:
            self.signal_path.write_text(f"{os.getpid()} {time.time_ns()}\n")
        except OSError as exc:  # they still follow at their next poll
            log.warning("cannot signal the other workers (%s): they follow at their next poll", exc)

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.signal_path.stat()  # type: ignore[union-attr]
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def watch(self, on_signal: Callable[[], None]) -> None:
        """Call ``on_signal`` whenever a worker signals (runs until cancelled)."""
        if self.signal_path is None:
            return
        seen = self._stamp()
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            stamp = self._stamp()
            if stamp != seen:
                seen = stamp
                on_signal()

    async def converge(
        self, done: Callable[[dict], bool], timeout: float
    ) -> tuple[bool, list[dict]]:
        """Wait until ``done(worker)`` holds for every live worker (at most ``timeout``
        s); (whether it did, each worker with ``converged``)."""
        deadline = time.monotonic() + timeout
        while True:
            workers = await asyncio.to_thread(self.metrics.workers)
            for w in workers:
                w["converged"] = bool(done(w))
            if all(w["converged"] for w in workers) or time.monotonic() >= deadline:
                return all(w["converged"] for w in workers), workers
            await asyncio.sleep(0.05)
