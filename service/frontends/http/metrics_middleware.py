"""HTTP request counters and latency per route template (bounded label cardinality)."""

from __future__ import annotations

import time

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics


class RequestMetrics:
    """A plain ASGI middleware: one count and one latency per request.

    Not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs every request in
    a task group and wraps each ``receive()`` of the body in another one, which cost the
    event loop more than the whole /predict response of 64 images. The latency ends where
    it ended there: when the response starts (or the app raises).
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500
        elapsed: float | None = None

        async def send_and_note(message: Message) -> None:
            nonlocal status, elapsed
            if message["type"] == "http.response.start" and elapsed is None:
                status = message["status"]
                elapsed = time.perf_counter() - t0
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            if path.startswith("/static"):
                path = "/static"
            protocol = "rest_v2" if path == "/v2" or path.startswith("/v2/") else "rest"
            self.metrics.on_request(
                protocol,
                path,
                scope["method"],
                str(status),
                status >= 400,
                elapsed if elapsed is not None else time.perf_counter() - t0,
            )


def install_request_metrics(app: FastAPI, metrics: Metrics) -> None:
    app.add_middleware(RequestMetrics, metrics=metrics)
