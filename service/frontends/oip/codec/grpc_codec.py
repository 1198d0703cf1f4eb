"""gRPC (``inference.GRPCInferenceService``) messages to and from the neutral request.

Inputs may arrive as ``raw_input_contents`` (what tritonclient and perf_analyzer send:
one bytes entry per input, in input order) or as typed ``contents`` lists; a request
uses one form for all its inputs. Responses always use ``raw_output_contents`` (BYTES
outputs framed with 4-byte little-endian lengths), which is what
``tritonclient.grpc.InferResult.as_numpy`` decodes first. The REST-only
``binary_data`` settings do not apply here. ``model_config_response`` answers
Triton's ``ModelConfig`` rpc (perf_analyzer calls it with ``-i grpc``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from service.errors import ProtocolError
from service.frontends.oip.codec import grpc_predict_v2_pb2 as pb
from service.frontends.oip.codec.outputs import output_tensors
from service.frontends.oip.codec.request import (
    InferRequest,
    InputTensor,
    RequestedOutput,
    check_input_header,
    check_input_set,
    parse_classification,
    resolve_outputs,
)
from service.frontends.oip.codec.signature import SEEDNET, ModelSignature
from service.frontends.oip.codec.tensors import (
    GRPC_CONTENTS_FIELDS,
    MAX_DIMS,
    decode_grpc_contents,
    decode_raw,
    encode_raw,
)

_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def parameter_value(p: pb.InferParameter) -> Any:
    """The Python value of an InferParameter (None when no known field is set)."""
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def parameters_dict(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    return {k: parameter_value(v) for k, v in params.items()}


def parse_grpc_request(
    msg: pb.ModelInferRequest,
    *,
    max_batch_size: int,
    signature: ModelSignature = SEEDNET,
) -> InferRequest:
    """Parse a ``ModelInfer`` request into an InferRequest; ProtocolError if it is bad.

    ``msg.model_name`` / ``msg.model_version`` are left to the caller (routing).
    """
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise ProtocolError(
            f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs; "
            "give one per input, in input order"
        )
    headers = []
    for inp in msg.inputs:
        where = f"input {inp.name[:64]!r}"
        if len(inp.shape) > MAX_DIMS:
            raise ProtocolError(
                f"{where}: shape has {len(inp.shape)} dimensions; at most {MAX_DIMS}"
            )
        shape = tuple(int(d) for d in inp.shape)
        if any(d < 0 for d in shape):
            raise ProtocolError(f"{where}: shape must be non-negative, got {list(shape)}")
        check_input_header(signature, inp.name, inp.datatype, shape, max_batch_size)
        if any(k in inp.parameters for k in _SHARED_MEMORY):
            raise ProtocolError(f"{where}: shared memory is not supported by this server")
        if raw and inp.HasField("contents"):
            raise ProtocolError(f"{where}: contents must be empty when raw_input_contents is used")
        headers.append((inp, shape, where))
    check_input_set(signature, [inp.name for inp, _, _ in headers])

    requested = []
    for out in msg.outputs:
        where = f"output {out.name!r}"
        if any(k in out.parameters for k in _SHARED_MEMORY):
            raise ProtocolError(f"{where}: shared memory is not supported by this server")
        k = out.parameters.get("classification")  # (indexing a protobuf map inserts the key)
        k = None if k is None else parameter_value(k)
        requested.append(
            RequestedOutput(out.name, binary=True, classification=parse_classification(k, where))
        )
    outputs = resolve_outputs(signature, requested, default_binary=True)

    inputs = []
    for i, (inp, shape, where) in enumerate(headers):
        if raw:
            data = decode_raw(raw[i], inp.datatype, shape, where)
        else:
            field = GRPC_CONTENTS_FIELDS.get(inp.datatype)
            if field is None:
                raise ProtocolError(f"{where}: {inp.datatype} must be sent as raw contents")
            values = getattr(inp.contents, field)
            data = decode_grpc_contents(values, inp.datatype, shape, where)
        inputs.append(InputTensor(inp.name, inp.datatype, shape, data))
    return InferRequest(msg.id, tuple(inputs), outputs, parameters_dict(msg.parameters))


def build_grpc_response(
    request: InferRequest,
    results: Mapping[str, np.ndarray],
    *,
    model_name: str,
    model_version: str,
    signature: ModelSignature = SEEDNET,
) -> pb.ModelInferResponse:
    """The ``ModelInferResponse`` for ``request`` given every model output in ``results``."""
    response = pb.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request.id
    )
    for t in output_tensors(request, results, signature):
        response.outputs.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        response.raw_output_contents.append(encode_raw(t.data, t.datatype))
    return response


def server_metadata_response(metadata: Mapping[str, Any]) -> pb.ServerMetadataResponse:
    """A ``ServerMetadataResponse`` from ``metadata.server_metadata(...)``."""
    return pb.ServerMetadataResponse(
        name=metadata["name"],
        version=metadata["version"],
        extensions=list(metadata["extensions"]),
    )


def model_metadata_response(metadata: Mapping[str, Any]) -> pb.ModelMetadataResponse:
    """A ``ModelMetadataResponse`` from ``metadata.model_metadata(...)``."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=metadata["name"],
        versions=list(metadata.get("versions", [])),
        platform=metadata["platform"],
        inputs=[
            tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"])
            for t in metadata["inputs"]
        ],
        outputs=[
            tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"])
            for t in metadata["outputs"]
        ],
    )


def model_config_response(config: Mapping[str, Any]) -> pb.ModelConfigResponse:
    """A ``ModelConfigResponse`` (Triton's extension) from ``metadata.model_config(...)``."""
    inputs = []
    for t in config["input"]:
        entry = pb.ModelInput(
            name=t["name"],
            data_type=pb.DataType.Value(t["data_type"]),
            dims=t["dims"],
            optional=t.get("optional", False),
        )
        if "reshape" in t:
            entry.reshape.shape.extend(t["reshape"]["shape"])
        inputs.append(entry)
    msg = pb.ModelConfig(
        name=config["name"],
        platform=config["platform"],
        max_batch_size=config["max_batch_size"],
        input=inputs,
        output=[
            pb.ModelOutput(
                name=t["name"], data_type=pb.DataType.Value(t["data_type"]), dims=t["dims"]
            )
            for t in config["output"]
        ],
    )
    if "dynamic_batching" in config:
        msg.dynamic_batching.max_queue_delay_microseconds = config["dynamic_batching"][
            "max_queue_delay_microseconds"
        ]
    return pb.ModelConfigResponse(config=msg)
