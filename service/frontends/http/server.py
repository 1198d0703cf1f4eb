"""uvicorn, configured from :class:`~service.config.Settings`, with a header deadline.

uvicorn has settings for idle keep-alive connections, graceful shutdown and (h11 only)
the size of a request head, but nothing that bounds how long a client may take to send
its request line and headers: a connection that trickles a header byte every few
seconds, or sends nothing at all, is kept for ever. :class:`HeaderDeadline` adds that
deadline to whichever HTTP implementation uvicorn would pick (httptools, else h11): the
head of every request must arrive within ``timeout_headers`` seconds of its first byte
(of the connection, for the first request), and within
``h11_max_incomplete_event_size`` bytes (h11 enforces this itself). A client that misses
either gets a JSON 408 / 431 and the connection is closed. Bodies have their own deadline
(``timeout_body``, in ``service.frontends.http.bodies``).

This leans on uvicorn's protocol classes (their parser callbacks, which follow
httptools' and h11's own API); tests/service/test_hostile.py pins the behaviour.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - uvicorn without httptools
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

from fastapi import FastAPI

from service.config import Settings

log = logging.getLogger("seednet.server")


def _error_bytes(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message, "status": status}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class HeaderDeadline:
    """The header clock of one connection (mixed into a uvicorn protocol class)."""

    header_timeout: float = 10.0
    max_head_bytes: int = 16 * 1024
    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes: int = 0

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_bytes = 0
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_too_slow)  # type: ignore[attr-defined]

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, data: bytes) -> None:
        transport = self.transport  # type: ignore[attr-defined]
        if not transport.is_closing():
            transport.write(data)
            transport.close()

    def _head_too_slow(self) -> None:
        self._head_timer = None
        log.info("closing a connection whose request head took over %gs", self.header_timeout)
        message = f"the request line and headers did not arrive within {self.header_timeout:g} s"
        self._refuse(_error_bytes(408, "Request Timeout", "request_timeout", message))

    def _count_head(self, n: int) -> bool:
        self._head_bytes += n
        if self._head_bytes <= self.max_head_bytes:
            return True
        self._disarm()
        message = f"the request line and headers exceed {self.max_head_bytes} bytes"
        self._refuse(
            _error_bytes(431, "Request Header Fields Too Large", "headers_too_large", message)
        )
        return False


if HttpToolsProtocol is not None:

    class _HttpToolsDeadline(HeaderDeadline, HttpToolsProtocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()  # the clock of a keep-alive connection's next request

        def on_url(self, url: bytes) -> None:
            if self._count_head(len(url)):
                super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            if self._count_head(len(name) + len(value)):
                super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm()
            if not self.transport.is_closing():
                super().on_headers_complete()

        # After a refusal the parser still walks the rest of what arrived; no request
        # cycle exists for it.
        def on_body(self, body: bytes) -> None:
            if self.cycle is not None and not self.transport.is_closing():
                super().on_body(body)

        def on_message_complete(self) -> None:
            if self.cycle is not None and not self.transport.is_closing():
                super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)


class _H11Deadline(HeaderDeadline, H11Protocol):
    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        import h11

        if self.conn.their_state is h11.IDLE:
            self._arm()  # bytes of a new request head
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()  # the head is complete (h11 moved on to the body)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def protocol_class(settings: Settings, implementation: str = "auto") -> type:
    """The HTTP protocol class uvicorn would pick, with :class:`HeaderDeadline` added."""
    use_h11 = implementation == "h11" or HttpToolsProtocol is None
    base = _H11Deadline if use_h11 else _HttpToolsDeadline
    return type(
        base.__name__,
        (base,),
        {
            "header_timeout": settings.timeout_headers,
            "max_head_bytes": settings.h11_max_incomplete_event_size,
        },
    )


def uvicorn_config(app: FastAPI, settings: Settings, **overrides: object) -> uvicorn.Config:
    """uvicorn's config for one in-process app (``python -m service`` and the tests)."""
    return uvicorn.Config(app, **{**uvicorn_options(settings), **overrides})


def worker_protocol_class(settings: Settings) -> type:
    """For worker processes: the module-level class itself (a class made per Settings
    cannot be pickled into a spawned worker), its deadlines set from ``settings``. Each
    worker calls this too (``service.app.app_from_environment``), so it holds there."""
    base = _H11Deadline if HttpToolsProtocol is None else _HttpToolsDeadline
    base.header_timeout = settings.timeout_headers
    base.max_head_bytes = settings.h11_max_incomplete_event_size
    return base


#: How long uvicorn's supervisor waits for a worker process to answer its health ping
#: before it kills and restarts it (uvicorn's default, 5 s, is less than a model load that
#: holds the GIL takes on a busy host: a worker was killed while it loaded).
WORKER_HEALTHCHECK_SECONDS = 120


def uvicorn_options(settings: Settings, workers: bool = False) -> dict[str, object]:
    """The one place uvicorn's settings come from (``workers``: for worker processes)."""
    extra: dict[str, object] = {}
    if workers and "timeout_worker_healthcheck" in inspect.signature(uvicorn.Config).parameters:
        extra["timeout_worker_healthcheck"] = WORKER_HEALTHCHECK_SECONDS
    return {
        **extra,
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": settings.access_log,
        "http": worker_protocol_class(settings) if workers else protocol_class(settings),
        "timeout_keep_alive": settings.timeout_keep_alive,
        "timeout_graceful_shutdown": settings.timeout_graceful_shutdown,
        "h11_max_incomplete_event_size": settings.h11_max_incomplete_event_size,
        "limit_concurrency": settings.limit_concurrency,
        "server_header": False,  # no version banner
        "lifespan": "on",
    }
