"""GET /models/{name}/rollout, and the admin routes that start and abort a rollout.

A rollout is registry state (``registry.rollouts``); these routes write it as the CLI's
``rollout start`` / ``rollout abort`` do, then make this process apply it at once and
wait until every worker process of this host applies it too (or the wait runs out: the
answer says which workers have not). Errors are the registry's, mapped in
``service.errors``: 404 unknown model / version / alias, 409 a rollout already running
or none to abort, 422 an invalid step, share or rule. A refused command changes nothing.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from registry import DEFAULT_ALIAS, Registry
from registry.rollouts import Rule, validate_steps
from service.errors import NotReady
from service.frontends.http.bodies import ADMIN_BODY_BYTES, read_admin_json
from service.frontends.http.deps import Admin, RegistryDep, State
from service.lifecycle.rollout import RolloutController
from service.state import ServiceState

router = APIRouter(tags=["rollouts"])


class StepBody(BaseModel):
    mode: str = Field(examples=["shadow"], description="shadow or canary")
    percent: float = Field(examples=[20], description="share of requests, 1 to 100 (canary: 99)")


class RolloutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    candidate: str = Field(examples=["2"], description="the version rolled out")
    alias: str = Field(DEFAULT_ALIAS, description="the alias it replaces when it passes")
    steps: list[dict] = Field(
        examples=[[{"mode": "shadow", "percent": 20}, {"mode": "canary", "percent": 10}]],
        description="shadow steps, then canary shares that grow; the alias moves after "
        "the last one passes",
    )
    rule: dict = Field(
        default_factory=dict,
        examples=[{"min_samples": 500, "min_agreement": 0.9, "max_p99_ratio": 1.5}],
        description="min_samples, max_error_rate_increase, max_p99_ratio, min_agreement, "
        "max_step_s, check {folder, min_accuracy, per_class} (docs/rollouts.md)",
    )
    wait_s: float = Field(60, ge=0, le=600, description="how long to wait for every worker")


class AbortRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=500)
    wait_s: float = Field(60, ge=0, le=600)


def _body(model: type[BaseModel], data: object) -> BaseModel:
    try:
        return model.model_validate({} if data is None else data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _controller(state: ServiceState) -> RolloutController:
    if state.rollout is None:
        raise NotReady()
    return state.rollout


def _record(registry: Registry, name: str) -> dict:
    registry.versions(name)  # 404 for a model the registry does not have
    state = registry.rollout_state(name)
    latest = state.latest
    return {
        "name": name,
        "revision": state.revision,
        "running": state.running is not None,
        "rollout": latest.to_dict() if latest is not None else None,
    }


async def _converged(state: ServiceState, name: str, wait_s: float) -> dict:
    """Wait until every worker of this host has applied the record (or ``wait_s`` ran
    out); what each serves. Only for the model this service serves."""
    controller = _controller(state)
    if name != state.settings.model_name or controller.state is None:
        return {"converged": None, "workers": []}
    revision = controller.state.revision
    done, workers = await controller.siblings.converge(lambda w: w["revision"] >= revision, wait_s)
    return {"converged": done, "workers": workers}


@router.get("/models/{name}/rollout", summary="The latest rollout, its live evidence, workers")
async def rollout_status(name: str, state: State, registry: RegistryDep) -> dict:
    out = await asyncio.to_thread(_record, registry, name)
    controller = state.rollout
    serves = name == state.settings.model_name and controller is not None
    out["evidence"] = (
        await asyncio.to_thread(controller.live_evidence) if serves and controller else None
    )
    out["workers"] = await asyncio.to_thread(state.metrics.workers) if serves else []
    return out


ROLLOUT_BODY = {
    "requestBody": {
        "required": True,
        "description": f"at most {ADMIN_BODY_BYTES} bytes",
        "content": {"application/json": {"schema": RolloutRequest.model_json_schema()}},
    }
}


@router.post(
    "/models/{name}/rollout",
    dependencies=[Admin],
    summary="Start rolling a candidate version out (shadow, canary steps, then the alias)",
    openapi_extra=ROLLOUT_BODY,
)
async def start_rollout(name: str, request: Request, state: State) -> dict:
    body = _body(RolloutRequest, await read_admin_json(request, state.settings))
    assert isinstance(body, RolloutRequest)
    steps = validate_steps(body.steps)  # 422 before anything is written
    rule = Rule.from_dict(body.rule)
    controller = _controller(state)
    await controller.start(name, body.candidate, steps, rule, body.alias)
    waited = await _converged(state, name, body.wait_s)
    return await asyncio.to_thread(_record, state.registry, name) | waited


@router.post(
    "/models/{name}/rollout/abort",
    dependencies=[Admin],
    summary="Stop the running rollout: the candidate is dropped, the alias stays",
)
async def abort_rollout(name: str, request: Request, state: State) -> dict:
    body = _body(AbortRequest, await read_admin_json(request, state.settings))
    assert isinstance(body, AbortRequest)
    controller = _controller(state)
    await controller.abort(name, body.reason or "aborted through the admin API")
    waited = await _converged(state, name, body.wait_s)
    return await asyncio.to_thread(_record, state.registry, name) | waited
