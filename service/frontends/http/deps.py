"""What a route needs, as typed FastAPI dependencies (``Annotated[..., Depends(...)]``)."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from registry import Registry
from service.config import Settings
from service.dataplane.inference import DataPlane
from service.dataplane.served import ServingModel
from service.errors import Forbidden, NotReady, Unauthorized
from service.frontends.http.bodies import has_unread_body
from service.lifecycle.host import ModelHost
from service.state import ServiceState


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]


async def get_settings(state: State) -> Settings:
    return state.settings


async def get_registry(state: State) -> Registry:
    return state.registry


async def get_host(state: State) -> ModelHost:
    if state.host is None:
        raise NotReady()
    return state.host


async def get_plane(state: State) -> DataPlane:
    if state.plane is None:
        raise NotReady()
    return state.plane


async def require_model(host: Annotated[ModelHost, Depends(get_host)]) -> ServingModel:
    """The serving model, or 503 while none is loaded yet."""
    return host.current()


async def require_admin(
    request: Request, settings: Annotated[Settings, Depends(get_settings)]
) -> None:
    """Bearer-token check: 401 without credentials, 403 with wrong ones or when disabled.

    Runs before any body is read (admin routes read theirs themselves, capped at a few
    KiB); a refusal with a body still on the wire closes the connection rather than
    letting the server read the rest of it.
    """
    close = has_unread_body(request)
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("bearer "):
        raise Unauthorized(
            "this route needs 'Authorization: Bearer <SEEDNET_ADMIN_TOKEN>'", close=close
        )
    if not settings.admin_token:
        raise Forbidden(
            "admin routes are disabled: the server has no SEEDNET_ADMIN_TOKEN", close=close
        )
    if not secrets.compare_digest(header[7:].strip().encode(), settings.admin_token.encode()):
        raise Forbidden("the admin token is not valid", close=close)


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
HostDep = Annotated[ModelHost, Depends(get_host)]
PlaneDep = Annotated[DataPlane, Depends(get_plane)]
ModelDep = Annotated[ServingModel, Depends(require_model)]
Admin = Depends(require_admin)
