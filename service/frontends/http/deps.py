"""What a route needs, as typed FastAPI dependencies (``Annotated[..., Depends(...)]``)."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from registry import Registry
from service.config import Settings
from service.errors import ApiError
from service.frontends.http.bodies import has_unread_body
from service.lifecycle.prepare import ServingModel
from service.state import ServiceState


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]


def get_settings(state: State) -> Settings:
    return state.settings


def get_registry(state: State) -> Registry:
    return state.registry


def require_model(state: State) -> ServingModel:
    """The serving model, or 503 while none is loaded yet."""
    if state.model is None:
        raise ApiError(503, "not_ready", "the model is still loading; retry shortly")
    return state.model


def require_admin(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> None:
    """Bearer-token check: 401 without credentials, 403 with wrong ones or when disabled.

    Runs before any body is read (admin routes read theirs themselves, capped at a few
    KiB); a refusal with a body still on the wire closes the connection rather than
    letting the server read the rest of it.
    """
    close = {"Connection": "close"} if has_unread_body(request) else None
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("bearer "):
        raise ApiError(
            401,
            "unauthorized",
            "this route needs 'Authorization: Bearer <SEEDNET_ADMIN_TOKEN>'",
            close,
        )
    if not settings.admin_token:
        raise ApiError(
            403,
            "forbidden",
            "admin routes are disabled: the server has no SEEDNET_ADMIN_TOKEN",
            close,
        )
    if not secrets.compare_digest(header[7:].strip().encode(), settings.admin_token.encode()):
        raise ApiError(403, "forbidden", "the admin token is not valid", close)


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
ModelDep = Annotated[ServingModel, Depends(require_model)]
Admin = Depends(require_admin)
