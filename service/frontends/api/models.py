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
from service.state import ServiceState

router = APIRouter(tags=["models"])


@router.get("/models", summary="Registry models, versions, aliases, metrics, and what serves")
async def list_models(state: State, registry: RegistryDep) -> dict:
    # (an object store answers over the network: off the event loop)
    out = await asyncio.to_thread(_registry_listing, registry)
    candidate = state.candidate
    return {
        "serving": state.model.info if state.model is not None else None,
        "requested": {"name": state.settings.model_name, "ref": state.settings.model_ref},
        # what each worker process of this host serves (SEEDNET_WORKERS)
        "workers": await asyncio.to_thread(state.metrics.workers),
        "rollout": _rollout_block(state, candidate.info if candidate is not None else None),
        "models": out,
    }


def _rollout_block(state: ServiceState, candidate: dict | None) -> dict | None:
    """The served alias's latest rollout, short (GET /models/{name}/rollout: all of it)."""
    rollout = state.rollout.rollout if state.rollout is not None else None
    if rollout is None:
        return None
    step = rollout.current_step
    return {
        "id": rollout.id,
        "state": rollout.state,
        "alias": rollout.alias,
        "stable": rollout.stable,
        "candidate": rollout.candidate,
        "step": f"{rollout.step + 1} of {len(rollout.steps)}: {step}" if step else None,
        "checked": rollout.checked,
        "candidate_loaded": candidate,
        "last_decision": rollout.decisions[-1].to_dict() if rollout.decisions else None,
        "details": f"/models/{rollout.model}/rollout",
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
    wait_s: float = Field(
        60, ge=0, le=600, description="how long to wait for every worker to serve it"
    )


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
    # 409 before loading anything when a rollout owns the alias (it moves it itself)
    await asyncio.to_thread(registry.refuse_during_rollout, name, body.alias)
    # The alias moves only if nobody moved one meanwhile (a compare-and-swap: 409 if so).
    token = (await asyncio.to_thread(registry.alias_state, name)).token
    move_alias = partial(registry.set_alias, name, body.alias, body.version, token)
    served = name == s.model_name and body.alias == s.model_ref
    if served:
        # Load first, move the alias, then swap: a version that cannot load is never
        # promoted, and a failed alias write leaves the old model serving.
        await host.load(body.version, name, commit=move_alias)
    else:
        await asyncio.to_thread(move_alias)
    out = {
        "name": name,
        "alias": body.alias,
        "version": body.version,
        "serving": state.model.info if state.model else None,
    }
    if not served or state.rollout is None:
        return out
    # The other workers of this host follow the alias: tell them now, and answer once
    # every one serves the new version (or say which do not yet).
    siblings = state.rollout.siblings
    siblings.signal()
    target = state.model.info["version"] if state.model else body.version
    done, workers = await siblings.converge(lambda w: w["version"] == target, body.wait_s)
    return out | {"converged": done, "workers": workers}
