"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.frontends.http.deps import State

router = APIRouter(tags=["health"])


@router.get("/health/live", summary="The process is up")
async def live() -> dict:
    return {"status": "ok"}


@router.get(
    "/health/ready",
    summary="A model is loaded and warmed up",
    responses={503: {"description": "still loading"}},
)
async def ready(state: State):
    if not state.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    return {"status": "ready", "model": state.model.info}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
