"""GET /models, and the admin routes that reload or promote the serving model.

Registry and load errors are not caught here: ``service.errors`` maps them (404 unknown
version, 409 conflict / integrity / cannot load, 422 invalid name, 503 a registry that
needs repair or cannot be written).

Admin routes take no body parameter: FastAPI would read (and buffer) a body before the
token dependency runs. The token is checked first, then the route reads at most a few
KiB itself.
"""

from __future__ import annotations

import asyncio
from functools import partial

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError

from registry import Registry
from service.frontends.http.bodies import ADMIN_BODY_BYTES, read_admin_json
from service.frontends.http.deps import Admin, HostDep, RegistryDep, State

router = APIRouter(tags=["models"])


@router.get("/models", summary="Registry models, versions, aliases, metrics, and what serves")
async def list_models(state: State, registry: RegistryDep) -> dict:
    # (an object store answers over the network: off the event loop)
    out = await asyncio.to_thread(_registry_listing, registry)
    return {
        "serving": state.model.info if state.model is not None else None,
        "requested": {"name": state.settings.model_name, "ref": state.settings.model_ref},
        "models": out,
    }


def _registry_listing(registry: Registry) -> list[dict]:
    out = []
    for name in registry.names():
        versions = []
        for mv in registry.versions(name):
            entry: dict = {"version": mv.version, "aliases": registry.aliases_of(mv)}
            if mv.problem is not None:
                entry["problem"] = mv.problem
            else:
                m = mv.manifest
                metrics = {
                    k: v
                    for k, v in vars(m.metrics).items()
                    if k != "per_class_accuracy" and v is not None
                }
                entry |= {
                    "created": m.created,
                    "arch": m.model.arch,
                    "parameters": m.model.parameters,
                    "metrics": metrics,
                    "parent": m.parent,
                }
            versions.append(entry)
        out.append({"name": name, "aliases": registry.aliases(name), "versions": versions})
    return out


class PromoteRequest(BaseModel):
    version: str = Field(examples=["2"])
    alias: str = Field("production", examples=["production"])


PROMOTE_BODY = {
    "requestBody": {
        "required": True,
        "description": f"at most {ADMIN_BODY_BYTES} bytes",
        "content": {"application/json": {"schema": PromoteRequest.model_json_schema()}},
    }
}


@router.post(
    "/models/reload",
    dependencies=[Admin],
    summary="Re-resolve the configured alias and swap the serving model",
)
async def reload_model(state: State, host: HostDep) -> dict:
    model = await host.load(state.settings.model_ref)
    return {"serving": model.info}


@router.post(
    "/models/{name}/promote",
    dependencies=[Admin],
    summary="Point an alias at a version; swaps the serving model if it is served",
    openapi_extra=PROMOTE_BODY,
)
async def promote(
    name: str, request: Request, state: State, host: HostDep, registry: RegistryDep
) -> dict:
    s = state.settings
    try:
        body = PromoteRequest.model_validate(await read_admin_json(request, s))
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    await asyncio.to_thread(registry.resolve, name, body.version)  # 404 before any change
    # The alias moves only if nobody moved one meanwhile (a compare-and-swap: 409 if so).
    token = (await asyncio.to_thread(registry.alias_state, name)).token
    move_alias = partial(registry.set_alias, name, body.alias, body.version, token)
    if name == s.model_name and body.alias == s.model_ref:
        # Load first, move the alias, then swap: a version that cannot load is never
        # promoted, and a failed alias write leaves the old model serving.
        await host.load(body.version, name, commit=move_alias)
    else:
        await asyncio.to_thread(move_alias)
    return {
        "name": name,
        "alias": body.alias,
        "version": body.version,
        "serving": state.model.info if state.model else None,
    }
