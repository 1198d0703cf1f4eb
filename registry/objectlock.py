"""The writers' lock of a model on an object store: one object with a lease.

``<model>/.lock`` is created with a conditional PUT (``If-None-Match: *``): exactly one
writer creates it. Its holder rewrites it every third of the lease (``If-Match`` its own
ETag), so its ETag keeps changing while the holder lives. A waiter that sees the same
ETag for a whole lease takes the lock over, again by ``If-Match`` (one waiter wins). The
lease is measured on the waiter's own monotonic clock, so clocks of different hosts never
matter. A holder whose renewal fails has lost the lock and must not commit:
:meth:`LeaseLock.ensure_held` says so before every commit point.

Alias moves do not take this lock: they are compare-and-swap writes of aliases.json.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from registry.errors import ConflictError, RegistryError
from registry.storage import ABSENT

if TYPE_CHECKING:
    from registry.objectstore import ObjectStorage

DEFAULT_LEASE_SECONDS = 30.0
LOCK_TIMEOUT_SECONDS = 120.0


def _lease_of(data: bytes | None, default: float) -> float:
    try:
        lease = float(json.loads(data or b"{}").get("lease_seconds", default))
    except (ValueError, TypeError, AttributeError):
        return default
    return min(max(lease, 0.5), 3600.0)


def _holder_of(data: bytes | None) -> str:
    try:
        info = json.loads(data or b"{}")
        return f"{info['host']} pid {info['pid']} since {info['acquired']}"
    except (ValueError, TypeError, KeyError):
        return "an unknown writer"


class LeaseLock:
    def __init__(
        self,
        store: ObjectStorage,
        key: str,
        what: str,
        lease_s: float = DEFAULT_LEASE_SECONDS,
        timeout_s: float = LOCK_TIMEOUT_SECONDS,
    ) -> None:
        self.store, self.key, self.what = store, key, what
        self.lease_s, self.timeout_s = lease_s, timeout_s
        self.owner = secrets.token_hex(8)
        self.etag: str | None = None
        self._beat = 0
        self._renewed_at = 0.0
        self._lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._acquired = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def _body(self) -> bytes:
        self._beat += 1
        info = {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "acquired": self._acquired,
            "lease_seconds": self.lease_s,
            "beat": self._beat,  # changes the ETag at every renewal
        }
        return json.dumps(info).encode()

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        seen: tuple[str, float] | None = None  # (ETag, when this waiter first saw it)
        pause = 0.05
        while True:
            data, etag = self.store.read_state(self.key)
            now = time.monotonic()
            try:
                if data is None:
                    self._take(ABSENT)
                    return
                if seen is None or seen[0] != etag:
                    seen = (etag, now)
                elif now - seen[1] > _lease_of(data, DEFAULT_LEASE_SECONDS):
                    self._take(etag)  # its holder stopped renewing a whole lease ago
                    return
            except ConflictError:
                seen = None  # another waiter was quicker: look again
                continue
            if now > deadline:
                raise ConflictError(
                    f"the registry lock of {self.what} is held by {_holder_of(data)}; "
                    "try again later"
                )
            time.sleep(pause)
            pause = min(pause * 2, 1.0)

    def _take(self, expected: str) -> None:
        self.etag = self.store.write_state(self.key, self._body(), expected)
        self._renewed_at = time.monotonic()
        self._thread = threading.Thread(target=self._renew, name="registry-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                assert self.etag is not None
                self.etag = self.store.write_state(self.key, self._body(), self.etag)
                self._renewed_at = time.monotonic()
            except ConflictError:
                self._lost = True  # taken over: this writer must not commit
                return
            except RegistryError:
                continue  # store unreachable for now: ensure_held decides by the clock

    def ensure_held(self) -> None:
        """ConflictError unless this writer still holds the lock (call before committing)."""
        late = time.monotonic() - self._renewed_at > self.lease_s * 2 / 3
        if self._lost or late:
            raise ConflictError(
                f"lost the registry lock of {self.what} (its lease of {self.lease_s:g} s "
                "ran out); nothing was committed, try again"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self._lost and self.etag is not None:
            self.store.delete_if(self.key, self.etag)
