"""GET /models, and the admin routes that reload or promote the serving model."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from service.errors import ApiError
from service.registry import NotFoundError, RegistryError
from service.state import get_state

router = APIRouter(tags=["models"])


def require_admin(request: Request) -> None:
    """Bearer-token check: 401 without credentials, 403 with wrong ones or when disabled."""
    token = get_state(request).settings.admin_token
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("bearer "):
        raise ApiError(
            401, "unauthorized", "this route needs 'Authorization: Bearer <SEEDNET_ADMIN_TOKEN>'"
        )
    if not token:
        raise ApiError(
            403, "forbidden", "admin routes are disabled: the server has no SEEDNET_ADMIN_TOKEN"
        )
    if not secrets.compare_digest(header[7:].strip().encode(), token.encode()):
        raise ApiError(403, "forbidden", "the admin token is not valid")


@router.get("/models", summary="Registry models, versions, aliases, metrics, and what serves")
async def list_models(request: Request) -> dict:
    state = get_state(request)
    reg = state.registry
    out = []
    for name in reg.names():
        aliases = reg.aliases(name)
        versions = []
        for mv in reg.versions(name):
            m = mv.manifest
            versions.append(
                {
                    "version": mv.version,
                    "aliases": sorted(a for a, v in aliases.items() if v == mv.version),
                    "created": m.get("created"),
                    "arch": m.get("model", {}).get("arch"),
                    "parameters": m.get("model", {}).get("parameters"),
                    "metrics": {
                        k: v for k, v in m.get("metrics", {}).items() if k != "per_class_accuracy"
                    },
                    "parent": m.get("parent"),
                }
            )
        out.append({"name": name, "aliases": aliases, "versions": versions})
    serving = state.model.info if state.model is not None else None
    return {
        "serving": serving,
        "requested": {"name": state.settings.model_name, "ref": state.settings.model_ref},
        "models": out,
    }


class PromoteRequest(BaseModel):
    version: str = Field(examples=["2"])
    alias: str = Field("production", examples=["production"])


@router.post(
    "/models/reload",
    dependencies=[Depends(require_admin)],
    summary="Re-resolve the configured alias and swap the serving model",
)
async def reload_model(request: Request) -> dict:
    state = get_state(request)
    try:
        model = await state.load(state.settings.model_ref)
    except NotFoundError as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    return {"serving": model.info}


@router.post(
    "/models/{name}/promote",
    dependencies=[Depends(require_admin)],
    summary="Point an alias at a version; swaps the serving model if it is served",
)
async def promote(name: str, body: PromoteRequest, request: Request) -> dict:
    state = get_state(request)
    s = state.settings
    try:
        state.registry.resolve(name, body.version)  # 404 before anything changes
        serves_it = name == s.model_name and body.alias == s.model_ref
        if serves_it:
            # load first, then move the alias: a version that cannot load is never promoted
            await state.load(body.version, name)
        state.registry.set_alias(name, body.alias, body.version)
    except NotFoundError as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    except RegistryError as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    return {
        "name": name,
        "alias": body.alias,
        "version": body.version,
        "serving": state.model.info if state.model else None,
    }
