"""GET /attention (the page) and GET /attention/reference (its per-class data)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from registry.manifest import ATTENTION_REFERENCE_FILE
from service.frontends.http.deps import ModelDep, RegistryDep, State

router = APIRouter(tags=["attention"])


@router.get("/attention", response_class=HTMLResponse, summary="Attention visualisation page")
async def attention_page(request: Request, state: State) -> HTMLResponse:
    model = state.model
    return request.app.state.templates.TemplateResponse(
        request,
        "attention.html",
        {
            "model": model.info if model is not None else {},
            "classes": model.class_names if model is not None else [],
            "max_upload_bytes": state.settings.max_upload_bytes,
            "explain_enabled": state.explanations is not None and state.explanations.enabled,
        },
    )


@router.get("/attention/reference", summary="Mean attention per block per class (test set)")
async def attention_reference(model: ModelDep, registry: RegistryDep) -> dict:
    # NotFoundError (a version without the file) is a 404, mapped in service.errors
    path = registry.open_verified(model.version, ATTENTION_REFERENCE_FILE)
    return {"model": model.info} | json.loads(path.read_text())
