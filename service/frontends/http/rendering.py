"""Failures rendered for HTTP, from the one table in ``service.errors``.

Two shapes, one status table: the JSON API answers ``{"error": {"code", "message",
"status"}}``; the inference protocol's REST routes answer ``{"error": "<message>"}`` (what
tritonclient reads). Both carry ``Retry-After`` when the table says so, and
``Connection: close`` when the error was sent before the whole body arrived.

A failure the client or its load caused is not logged here (the access log has the
status); a server fault is logged once with its traceback and answered with a generic
500. Anything a route raises that escapes the handlers is answered by
:class:`CatchAllMiddleware` with a complete JSON 500, and the exception stops there
(Starlette's own last resort sends its 500 and re-raises, which makes uvicorn drop the
connection: a keep-alive client's next request on it would fail with a reset).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    FAILURES,
    MAX_MESSAGE_CHARS,
    error_code,
    failure_of,
    log_failure,
    public_message,
    retry_after,
)

log = logging.getLogger("seednet.errors")


def failure_headers(exc: BaseException) -> dict[str, str] | None:
    headers = {}
    seconds = retry_after(exc)
    if seconds is not None:
        headers["Retry-After"] = str(seconds)
    if getattr(exc, "close", False):
        headers["Connection"] = "close"
    return headers or None


def error_response(
    status: int, code: str, message: str, headers: dict | None = None
) -> JSONResponse:
    """The JSON API's error shape."""
    return JSONResponse(
        {"error": {"code": code, "message": message, "status": status}},
        status_code=status,
        headers=headers,
    )


def json_api_error(exc: BaseException) -> JSONResponse:
    """``exc`` in the JSON API's shape, status and headers from the table."""
    return error_response(
        failure_of(exc).http, error_code(exc), public_message(exc), failure_headers(exc)
    )


def v2_error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """The inference protocol's error shape, ``{"error": "<message>"}``."""
    return JSONResponse({"error": message[:MAX_MESSAGE_CHARS]}, status_code=status, headers=headers)


def v2_error(exc: BaseException) -> JSONResponse:
    """``exc`` in the inference protocol's shape, status and headers from the table."""
    return v2_error_response(failure_of(exc).http, public_message(exc), failure_headers(exc))


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "not_ready",
}


class CatchAllMiddleware:
    """The last resort: an unexpected exception becomes a complete JSON 500, nothing more.

    Sits just outside FastAPI's exception handlers. If the response had already started,
    half of it is on the wire and closing the connection is the only honest end, so the
    exception goes on to uvicorn; no route of this service streams, so that never happens.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            # Nobody to answer; a response still completes the request for the middleware
            # around (metrics count it as nginx does: 499) and uvicorn drops it unsent.
            log.info("client left during %s %s", scope.get("method"), scope.get("path"))
            if not started:
                response = error_response(
                    499, "client_closed_request", "the client closed the connection"
                )
                await response(scope, receive, send)
        except Exception as exc:
            log.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            await json_api_error(exc)(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """The JSON API's error handlers (the ``/v2`` routes render their own shape)."""

    async def _failure(request: Request, exc: Exception):
        log_failure(exc, f"{request.method} {request.url.path}")
        return json_api_error(exc)

    for cls, _ in FAILURES:
        app.add_exception_handler(cls, _failure)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query"))
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        message = "; ".join(parts) or "invalid request"
        return error_response(422, "invalid_request", message[:MAX_MESSAGE_CHARS])

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = "no such route; see /docs for the API"
        return error_response(
            exc.status_code,
            _HTTP_CODES.get(exc.status_code, "error"),
            message,
            getattr(exc, "headers", None),
        )

    # Added first, so it wraps the handlers above and sits inside every other middleware.
    app.add_middleware(CatchAllMiddleware)
