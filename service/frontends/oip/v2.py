"""The Open Inference Protocol v2 over HTTP (KServe v2 / Triton): ``/v2/...``.

Health, server and model metadata, Triton's model config, readiness and inference,
with JSON or binary tensors (``service.frontends.oip.codec.rest``). Requests share the model,
the batcher and the image limits of ``/predict`` (``service.frontends.oip.common``).

Errors are the protocol's shape, ``{"error": "<message>"}``, not the JSON API's:
``V2Route`` wraps every route of this router, so any error raised in a v2 route or
its dependencies is turned into that shape in one place, with the status, code and
``Retry-After`` of the one failure table (``service.errors``). Paths under ``/v2`` that
match no route get the same shape from the catch-all route at the end.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.errors import BadRequest, PayloadTooLarge, log_failure
from service.frontends.http.bodies import receive_body
from service.frontends.http.deps import PlaneDep, State
from service.frontends.http.rendering import v2_error, v2_error_response
from service.frontends.oip import explain
from service.frontends.oip.codec.rest import (
    INFERENCE_HEADER_CONTENT_LENGTH,
    build_rest_response,
    parse_header_length,
    parse_rest_request,
)
from service.frontends.oip.common import (
    model_config_doc,
    model_metadata_doc,
    request_limits,
    served_model,
    server_metadata_doc,
    signature_of,
)
from service.frontends.versions import answered_by, route_from

log = logging.getLogger("seednet.v2")

#: Bodies larger than this are parsed on a worker thread (JSON of many images is CPU work).
INLINE_PARSE_BYTES = 256 * 1024
PROTOCOL = "rest_v2"  # the metrics' protocol label


class V2Route(APIRoute):
    """An APIRoute whose errors come out as ``{"error": "..."}`` (the one place for it)."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except StarletteHTTPException as exc:
                return v2_error_response(exc.status_code, str(exc.detail))
            except RequestValidationError as exc:  # (every v2 parameter is a string today)
                message = "; ".join(str(e.get("msg")) for e in exc.errors())
                return v2_error_response(400, message)
            except Exception as exc:
                log_failure(exc, f"{request.method} {request.url.path}")
                return v2_error(exc)

        return handle


router = APIRouter(prefix="/v2", tags=["inference protocol v2"], route_class=V2Route)


async def path_version(request: Request) -> str | None:
    """The ``{version}`` of ``.../versions/{version}/...`` routes (None on the others)."""
    return request.path_params.get("version")


Version = Annotated[str | None, Depends(path_version)]
VERSION_PARAMETER = {
    "parameters": [
        {
            "name": "version",
            "in": "path",
            "required": True,
            "schema": {"type": "string"},
            "description": "a registry version; only the served one answers",
        }
    ]
}


def model_route(method: str, suffix: str, summary: str):
    """Register an endpoint on ``/models/{name}{suffix}`` and on the versioned path."""

    def register(endpoint):
        router.add_api_route(
            f"/models/{{name}}{suffix}", endpoint, methods=[method], summary=summary
        )
        router.add_api_route(
            f"/models/{{name}}/versions/{{version}}{suffix}",
            endpoint,
            methods=[method],
            summary=f"{summary} (one version)",
            openapi_extra=VERSION_PARAMETER,
        )
        return endpoint

    return register


@router.get("", summary="Server metadata: name, version, protocol extensions")
async def server_metadata(state: State) -> dict:
    return server_metadata_doc(state)


@router.get("/health/live", summary="The server is live")
async def live() -> dict:
    return {"live": True}


@router.get(
    "/health/ready",
    summary="The server is ready (same answer as /health/ready)",
    responses={400: {"description": "not ready: the model is still loading"}},
)
async def ready(state: State) -> Response:
    if not state.ready:  # the protocol says 4xx for "not ready"
        return v2_error_response(400, "the model is still loading")
    return JSONResponse({"ready": True})


@model_route("GET", "", "Model metadata: platform, registry versions, inputs and outputs")
async def model_metadata(name: str, version: Version, state: State) -> dict:
    return model_metadata_doc(state, served_model(state, name, version))


@model_route("GET", "/ready", "The model (version) is loaded and serving")
async def model_ready(name: str, version: Version, state: State) -> dict:
    model = served_model(state, name, version)  # 4xx for any model that is not
    return {"name": model.info["name"], "version": model.info["version"], "ready": True}


@model_route("GET", "/config", "Triton model configuration (max_batch_size, inputs, outputs)")
async def model_config(name: str, version: Version, state: State) -> dict:
    return model_config_doc(state, served_model(state, name, version))


@model_route("POST", "/infer", "Inference: images (UINT8) or image_bytes (BYTES), JSON or binary")
async def infer(
    name: str, version: Version, request: Request, state: State, plane: PlaneDep
) -> Response:
    settings = state.settings
    model = served_model(state, name, version)  # 404/400/503 before reading the body
    route = route_from(request.headers, version)  # a version or client key (rollouts)
    await plane.admit()  # and 429 when the queue is already too long
    limits = request_limits(settings)
    t0 = time.perf_counter()
    body = await read_body(request, limits.total_bytes, settings.timeout_body)
    t1 = time.perf_counter()
    plane.observe("read_body", PROTOCOL, t1 - t0)
    length = parse_header_length(request.headers.get(INFERENCE_HEADER_CONTENT_LENGTH))
    parse = partial(
        parse_rest_request,
        body,
        length,
        max_batch_size=settings.max_images_per_request,
        max_json_bytes=limits.json_bytes,
        max_json_containers=limits.json_containers,
        signature=signature_of(model),  # a calibrated version's outputs are the default too
    )
    parsed = await asyncio.to_thread(parse) if len(body) > INLINE_PARSE_BYTES else parse()
    plane.observe("parse", PROTOCOL, time.perf_counter() - t1)
    result = await explain.infer(state, parsed, PROTOCOL, route)  # (explain outputs when named)
    t2 = time.perf_counter()
    response = build_rest_response(
        parsed,
        result.outputs,
        model_name=result.model.info["name"],
        model_version=result.model.info["version"],
        signature=signature_of(result.model),
    )
    plane.observe("serialise", PROTOCOL, time.perf_counter() - t2)
    return Response(response.body, headers={**response.headers, **answered_by(result.model)})


CATCH_ALL = "/v2/{path:path}"


@router.api_route(
    "/{path:path}",
    methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"],
    include_in_schema=False,
)
async def no_such_route(request: Request) -> Response:
    # A known path with another method is a 405, as Starlette would answer it.
    for route in router.routes:
        if isinstance(route, APIRoute) and route.path != CATCH_ALL:
            match, _ = route.matches({**request.scope, "method": "\0"})
            if match == Match.PARTIAL:
                message = f"{request.method} is not allowed on {request.url.path}"
                return v2_error_response(405, message)
    return v2_error_response(404, f"no such route: {request.url.path}")


#: Content-Encoding values tritonclient can send, and their zlib window bits.
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, at most ``limit`` bytes (also after decompression): else 413,
    read as it arrives (``service.frontends.http.bodies.receive_body``: 408 after ``timeout`` s)."""
    too_large = f"the request body is over the limit of {limit} bytes"
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", *_DECODERS):
        raise BadRequest(f"Content-Encoding {encoding!r} is not supported; use gzip or deflate")
    body = b"".join([chunk async for chunk in receive_body(request, limit, timeout)])
    if encoding == "identity":
        return body
    decoder = zlib.decompressobj(_DECODERS[encoding])
    try:
        out = decoder.decompress(body, limit + 1)  # never inflate past the limit
    except zlib.error as exc:
        raise BadRequest(f"the {encoding} body cannot be decompressed: {exc}") from None
    if len(out) > limit:
        raise PayloadTooLarge(too_large)
    if not decoder.eof:
        raise BadRequest(f"the {encoding} body is truncated")
    return out
