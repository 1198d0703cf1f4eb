"""Every failure as one JSON shape, ``{"error": {"code", "message", "status"}}``.

Domain errors (registry, model loading, exports, image preprocessing) know nothing of
HTTP; :data:`STATUS_BY_ERROR` maps them to a status here, once, and the handlers below
turn any of them into a response. Routes raise and never catch them.

Anything else a route raises is answered by :class:`CatchAllMiddleware` with a complete
JSON 500, and the exception stops there. (Starlette's own last resort sends its 500 and
then re-raises, which makes uvicorn drop the connection: a keep-alive client's next
request on it would fail with a reset.)
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from registry.errors import (
    ConflictError,
    IntegrityError,
    InvalidNameError,
    MetadataError,
    NotFoundError,
    RegistryError,
    StorageError,
)
from seednet.export import ExportError
from service.dataplane.backends import ModelLoadError
from service.dataplane.batching import DeadlineExceeded, Overloaded
from service.dataplane.images import (
    CorruptImageError,
    EmptyFileError,
    FileTooLargeError,
    PreprocessingError,
    TooManyPixelsError,
    UnsupportedImageError,
)

log = logging.getLogger("seednet.errors")


class ApiError(Exception):
    """An error with an HTTP status, a machine-readable code and a sentence for a person."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


# Most specific first: the first class an error is an instance of wins.
STATUS_BY_ERROR: tuple[tuple[type[Exception], int], ...] = (
    (NotFoundError, 404),
    (InvalidNameError, 422),
    (ConflictError, 409),
    # The registry needs an operator (repair, a writable folder); the model keeps serving.
    (MetadataError, 503),
    (StorageError, 503),
    (IntegrityError, 409),  # the version's files differ from what was published
    (RegistryError, 409),
    (ModelLoadError, 409),  # the version exists but cannot be served here
    (ExportError, 409),
    (DeadlineExceeded, 503),  # waited past SEEDNET_QUEUE_TIMEOUT_MS, never computed
    (Overloaded, 429),  # the queue is full: refused before waiting
    (EmptyFileError, 422),
    (CorruptImageError, 422),
    (FileTooLargeError, 413),
    (TooManyPixelsError, 413),
    (UnsupportedImageError, 415),
    (PreprocessingError, 400),
)


def http_status(exc: Exception) -> int:
    """The HTTP status of a domain error (500 for anything unmapped)."""
    return next((status for cls, status in STATUS_BY_ERROR if isinstance(exc, cls)), 500)


def error_response(
    status: int, code: str, message: str, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, "status": status}},
        status_code=status,
        headers=headers,
    )


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
_DOMAIN_ERRORS = tuple(cls for cls, _ in STATUS_BY_ERROR)


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
        except Exception:
            log.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            response = error_response(
                500,
                "internal_error",
                "the server failed to handle this request; it has been logged",
            )
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    async def _domain(_: Request, exc: Exception):
        code = getattr(exc, "code", None) or "error"
        retry = getattr(exc, "retry_after", None)  # admission control says when to retry
        headers = {"Retry-After": str(retry)} if retry is not None else None
        return error_response(http_status(exc), code, " ".join(str(exc).split()), headers)

    for cls in _DOMAIN_ERRORS:
        app.add_exception_handler(cls, _domain)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query"))
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

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
