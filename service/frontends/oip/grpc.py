"""KServe's ``inference.GRPCInferenceService`` on ``grpc.aio``, inside the app's event loop.

The six KServe rpcs plus Triton's ``ModelConfig`` (which perf_analyzer needs for
``-i grpc``).

The lifespan starts it (when ``SEEDNET_GRPC_PORT`` is set) after the model is loaded
and stops it before the batcher stops. It runs in the same event loop as uvicorn and
hands every inference to the same data plane as the HTTP front ends (gRPC and HTTP
requests are merged into the same forward passes, under the same limits and metrics).
The largest message it takes is the inference protocol's request limit
(``service.frontends.oip.common.request_limits``: the binary part plus the header).

Errors: every rpc goes through :func:`_rpc`, which counts it in the metrics and answers
an error with the gRPC code, message and ``retry-after`` trailing metadata of the one
failure table (``service.errors``); no traceback is logged for what a client or the load
caused. A message that is not valid protobuf is answered ``INVALID_ARGUMENT`` the same
way (:class:`_Undecodable`), not left to grpc's own traceback.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from service.errors import (
    ModelNotServed,
    NotReady,
    ProtocolError,
    failure_of,
    log_failure,
    public_message,
    retry_after,
)
from service.frontends.oip import explain
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
    HEADER_ALLOWANCE,
    model_config_doc,
    model_metadata_doc,
    request_limits,
    served_model,
    server_metadata_doc,
    signature_of,
)
from service.frontends.versions import MODEL_VERSION_HEADER, route_from
from service.state import ServiceState

log = logging.getLogger("seednet.grpc")

SERVICE = "inference.GRPCInferenceService"
PROTOCOL = "grpc"  # the metrics' protocol label
GRACE_SECONDS = 5.0
#: Responses are small (probabilities and attention of at most a few hundred images).
MAX_SEND_BYTES = 16 * 1024 * 1024

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Method = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


class _Undecodable:
    """What a request that is not valid protobuf arrives as (see :class:`_SafeDecoding`)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _safe(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # protobuf's DecodeError, or worse
            return _Undecodable(f"the message is not a valid protobuf request: {exc}")

    return decode


class _SafeDecoding(grpc.aio.ServerInterceptor):
    """Hands an undecodable message to the rpc as :class:`_Undecodable` (which answers
    INVALID_ARGUMENT and is counted), instead of grpc logging a traceback."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return handler._replace(request_deserializer=_safe(handler.request_deserializer))


def _rpc(method: Method) -> Method:
    """Count the call in the metrics and turn any error into the table's gRPC status."""
    route = f"{SERVICE}/{method.__name__}"

    @functools.wraps(method)
    async def call(self: InferenceServicer, request, context: grpc.aio.ServicerContext):
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if isinstance(request, _Undecodable):
                raise ProtocolError(request.reason)
            return await method(self, request, context)
        except Exception as exc:
            log_failure(exc, route)
            code = grpc.StatusCode[failure_of(exc).grpc]
            seconds = retry_after(exc)
            if seconds is not None:
                context.set_trailing_metadata((("retry-after", str(seconds)),))
            await context.abort(code, public_message(exc))  # raises: the call ends here
        finally:
            self.state.metrics.on_request(
                PROTOCOL,
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
        except (ModelNotServed, NotReady):  # known but not loaded (yet); unknown: an error
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @_rpc
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context
    ) -> pb.ServerMetadataResponse:
        return server_metadata_response(server_metadata_doc(self.state))

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
        state = self.state
        model = served_model(state, request.model_name, request.model_version)
        metadata = {k.lower(): v for k, v in context.invocation_metadata() or ()}
        route = route_from(metadata, request.model_version or None)  # (rollouts)
        plane = state.plane
        if plane is None:
            raise NotReady()
        await plane.admit()  # RESOURCE_EXHAUSTED before parsing when the queue is too long
        t0 = time.perf_counter()
        parsed = parse_grpc_request(
            request,
            max_batch_size=state.settings.max_images_per_request,
            signature=signature_of(model),  # a calibrated version's outputs are the default too
        )
        plane.observe("parse", PROTOCOL, time.perf_counter() - t0)
        result = await explain.infer(state, parsed, PROTOCOL, route)  # (explain outputs when named)
        version = result.model.info["version"]
        await context.send_initial_metadata(((MODEL_VERSION_HEADER.lower(), version),))
        t1 = time.perf_counter()
        response = build_grpc_response(
            parsed,
            result.outputs,
            model_name=result.model.info["name"],
            model_version=result.model.info["version"],
            signature=signature_of(result.model),
        )
        plane.observe("serialise", PROTOCOL, time.perf_counter() - t1)
        return response


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def max_receive_bytes(state: ServiceState) -> int:
    """The largest message taken: the binary part of a request plus its header."""
    limit = request_limits(state.settings).binary_bytes + HEADER_ALLOWANCE
    return min(limit, 2**31 - 1)  # gRPC's limits are int32


async def start_grpc_server(state: ServiceState, port: int) -> grpc.aio.Server:
    """Start the gRPC server on ``settings.host:port`` (0: any free port) in this loop.

    Records the bound port in ``state.grpc_port``; a port that cannot be bound stops
    start-up with an error.
    """
    server = grpc.aio.server(
        interceptors=[_SafeDecoding()],
        options=[
            ("grpc.max_receive_message_length", max_receive_bytes(state)),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
        ],
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
