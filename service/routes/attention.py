"""GET /attention (the page) and GET /attention/reference (its per-class data)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from service.errors import ApiError
from service.registry import NotFoundError
from service.state import get_state

router = APIRouter(tags=["attention"])

REFERENCE_FILE = "attention_per_class.json"


@router.get("/attention", response_class=HTMLResponse, summary="Attention visualisation page")
async def attention_page(request: Request) -> HTMLResponse:
    state = get_state(request)
    model = state.model.info if state.model is not None else {}
    return request.app.state.templates.TemplateResponse(
        request,
        "attention.html",
        {
            "model": model,
            "classes": state.model.class_names if state.model is not None else [],
            "static_url": str(request.url_for("static", path="")).rstrip("/"),
            "max_upload_bytes": state.settings.max_upload_bytes,
        },
    )


@router.get("/attention/reference", summary="Mean attention per block per class (test set)")
async def attention_reference(request: Request) -> dict:
    state = get_state(request)
    model = state.require_model()
    try:
        path = state.registry.open_verified(model.version, REFERENCE_FILE)
    except NotFoundError:
        raise ApiError(
            404, "not_found", f"{model.version.ref} has no per-class attention data"
        ) from None
    data = json.loads(path.read_text())
    return {"model": model.info} | data
