"""HTTP request counters and latency per route template (bounded label cardinality)."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request

from service.metrics import Metrics


def install_request_metrics(app: FastAPI, metrics: Metrics) -> None:
    @app.middleware("http")
    async def _count(request: Request, call_next):
        t0 = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            if path.startswith("/static"):
                path = "/static"
            protocol = "rest_v2" if path == "/v2" or path.startswith("/v2/") else "rest"
            metrics.on_request(
                protocol,
                path,
                request.method,
                str(status),
                status >= 400,
                time.perf_counter() - t0,
            )
