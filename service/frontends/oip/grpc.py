"""KServe's ``inference.GRPCInferenceService`` on ``grpc.aio``, inside the app's event loop.

The six KServe rpcs plus Triton's ``ModelConfig`` (which perf_analyzer needs for
``-i grpc``).

The lifespan starts it (when ``SEEDNET_GRPC_PORT`` is set) after the model is loaded
and stops it before the batcher stops. It runs in the same event loop as uvicorn and
shares everything with the REST front ends: the serving model, the batcher (gRPC and
HTTP requests are merged into the same forward passes), the image limits and the
metrics. The largest message it accepts is ``service.frontends.oip.common.max_request_bytes``, the
same limit as a REST body.

Errors: the status ``service.frontends.oip.common.error_status`` gives an error becomes a gRPC code
(400 INVALID_ARGUMENT, 404 NOT_FOUND, 503 UNAVAILABLE...) with the same message,
applied in one place (``_rpc``).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from service.frontends.oip.codec import grpc_predict_v2_pb2 as pb
from service.frontends.oip.codec import grpc_predict_v2_pb2_grpc as pb_grpc
from service.frontends.oip.codec.grpc_codec import (
    build_grpc_response,
    model_config_response,
    model_metadata_response,
    parse_grpc_request,
    server_metadata_response,
)
from service.frontends.oip.common import (
    OipError,
    error_status,
    max_request_bytes,
    model_config_doc,
    model_metadata_doc,
    run_inference,
    served_model,
    server_metadata_doc,
    signature_of,
)
from service.state import ServiceState

log = logging.getLogger("seednet.grpc")

SERVICE = "inference.GRPCInferenceService"
#: HTTP status of a refused request -> gRPC code (an image the service cannot take is
#: a bad argument, whatever the HTTP status /predict gives it).
GRPC_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
}
GRACE_SECONDS = 5.0

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Method = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def _rpc(method: Method) -> Method:
    """Count the call in the metrics and turn any error into a gRPC status."""
    route = f"{SERVICE}/{method.__name__}"

    @functools.wraps(method)
    async def call(self: InferenceServicer, request, context: grpc.aio.ServicerContext):
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await method(self, request, context)
        except Exception as exc:
            mapped = error_status(exc)
            if mapped is None:
                log.exception("unexpected error in %s", route)
                code, message = grpc.StatusCode.INTERNAL, "the server failed; it is logged"
            else:
                status, message = mapped
                code = GRPC_CODES.get(status, grpc.StatusCode.INVALID_ARGUMENT)
            await context.abort(code, message)  # raises: the call ends here
        finally:
            self.state.metrics.on_request(
                "grpc",
                route,
                "RPC",
                code.name,
                code != grpc.StatusCode.OK,
                time.perf_counter() - t0,
            )

    return call


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The six rpcs of the KServe v2 gRPC protocol, and Triton's ModelConfig."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    @_rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.state.ready)

    @_rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        try:
            served_model(self.state, request.name, request.version)
        except OipError as exc:
            if exc.status == 404:  # a model the registry does not know is an error
                raise
            return pb.ModelReadyResponse(ready=False)  # known but not loaded (yet)
        return pb.ModelReadyResponse(ready=True)

    @_rpc
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context
    ) -> pb.ServerMetadataResponse:
        return server_metadata_response(server_metadata_doc())

    @_rpc
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context
    ) -> pb.ModelMetadataResponse:
        model = served_model(self.state, request.name, request.version)
        return model_metadata_response(model_metadata_doc(self.state, model))

    @_rpc
    async def ModelConfig(self, request: pb.ModelConfigRequest, context) -> pb.ModelConfigResponse:
        model = served_model(self.state, request.name, request.version)
        return model_config_response(model_config_doc(self.state, model))

    @_rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        served_model(self.state, request.model_name, request.model_version)
        parsed = parse_grpc_request(
            request, max_batch_size=self.state.settings.max_images_per_request
        )
        results, model = await run_inference(self.state, parsed)
        return build_grpc_response(
            parsed,
            results,
            model_name=model.info["name"],
            model_version=model.info["version"],
            signature=signature_of(model),
        )


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_grpc_server(state: ServiceState, port: int) -> grpc.aio.Server:
    """Start the gRPC server on ``settings.host:port`` (0: any free port) in this loop.

    Records the bound port in ``state.grpc_port``; a port that cannot be bound stops
    start-up with an error.
    """
    limit = min(max_request_bytes(state.settings), 2**31 - 1)  # gRPC's limits are int32
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(state), server)
    address = listen_address(state.settings.host, port)
    bound = server.add_insecure_port(address)
    if bound == 0:  # older grpcio returns 0 instead of raising
        raise RuntimeError(f"gRPC cannot listen on {address}")
    await server.start()
    state.grpc_port = bound
    log.info("gRPC (KServe v2) listening on %s", listen_address(state.settings.host, bound))
    return server


async def stop_grpc_server(state: ServiceState, server: grpc.aio.Server) -> None:
    """Refuse new calls, let running ones finish (up to GRACE_SECONDS), then stop."""
    await server.stop(GRACE_SECONDS)
    state.grpc_port = None
