"""HTTP/REST inference bodies: JSON, with Triton's binary tensor data extension.

A request body is a JSON object, optionally followed by raw tensor bytes. When raw
bytes follow, the ``Inference-Header-Content-Length`` header gives the JSON's length,
each binary input says ``"parameters": {"binary_data_size": n}`` instead of
``"data"``, and the bytes follow in the order of those inputs (BYTES elements framed
with a 4-byte little-endian length). Responses mirror this: an output requested with
``"binary_data": true`` (or all outputs, with the request parameter
``"binary_data_output": true``, which ``tritonclient`` sets when it names no outputs)
is sent as raw bytes after the JSON, and the response carries the same header.

Error bodies are ``{"error": "<message>"}``: ``tritonclient`` reads that string.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service.errors import PayloadTooLarge, ProtocolError
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
    byte_size,
    decode_json,
    decode_raw,
    encode_raw,
    parse_shape,
    to_json_data,
)

#: Header giving the length of the JSON part of a body that has binary tensors after it.
INFERENCE_HEADER_CONTENT_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def parse_header_length(value: str | None) -> int | None:
    """The ``Inference-Header-Content-Length`` header value (None when absent)."""
    if value is None:
        return None
    try:
        length = int(value.strip())
    except ValueError:
        raise ProtocolError(
            f"{INFERENCE_HEADER_CONTENT_LENGTH} must be an integer, got {value!r}"
        ) from None
    if length < 0:
        raise ProtocolError(f"{INFERENCE_HEADER_CONTENT_LENGTH} must not be negative")
    return length


def _object(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} must be a JSON object")
    return value


def _bool(value: Any, where: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ProtocolError(f"{where} must be true or false")
    return value


def parse_rest_request(
    body: bytes,
    header_length: int | None,
    *,
    max_batch_size: int,
    signature: ModelSignature = SEEDNET,
    max_json_bytes: int | None = None,
    max_json_containers: int | None = None,
) -> InferRequest:
    """Parse a ``POST /v2/models/{m}[/versions/{v}]/infer`` body into an InferRequest.

    ``header_length`` is the ``Inference-Header-Content-Length`` value (see
    ``parse_header_length``); None or 0 means the whole body is JSON, as in Triton.
    ``max_json_bytes`` (413 past it) and ``max_json_containers`` (arrays and objects)
    bound what JSON parsing may cost, checked before parsing. Raises ProtocolError for
    anything a client got wrong.
    """
    body = bytes(body)
    if header_length:
        if header_length > len(body):
            raise ProtocolError(
                f"{INFERENCE_HEADER_CONTENT_LENGTH} is {header_length} but the body has "
                f"only {len(body)} bytes"
            )
        head, tail = body[:header_length], memoryview(body)[header_length:]
    else:
        head, tail = body, memoryview(b"")
    if max_json_bytes is not None and len(head) > max_json_bytes:
        raise PayloadTooLarge(
            f"the JSON part of the request is {len(head)} bytes; at most {max_json_bytes} "
            "(send image files and large tensors as binary data)"
        )
    if max_json_containers is not None:
        containers = head.count(b"[") + head.count(b"{")
        if containers > max_json_containers:
            raise ProtocolError(
                f"the JSON holds {containers} arrays and objects; a valid request holds "
                f"at most {max_json_containers}"
            )
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"the request is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError("the request must be a JSON object")

    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise ProtocolError("id must be a string")
    parameters = _object(doc.get("parameters"), "parameters")
    binary_output = _bool(
        parameters.get("binary_data_output"), "parameters.binary_data_output", False
    )

    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not all(isinstance(i, dict) for i in raw_inputs):
        raise ProtocolError("inputs must be a list of JSON objects")

    # Pass 1: everything but the data, so nothing is decoded for a request we refuse.
    headers = []
    for i, inp in enumerate(raw_inputs):
        name, datatype = inp.get("name"), inp.get("datatype")
        where = f"input {name!r}" if isinstance(name, str) else f"inputs[{i}]"
        shape = parse_shape(inp.get("shape"), where)
        check_input_header(signature, name, datatype, shape, max_batch_size)
        params = _object(inp.get("parameters"), f"{where}: parameters")
        if any(k in params for k in _SHARED_MEMORY):
            raise ProtocolError(f"{where}: shared memory is not supported by this server")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ProtocolError(f"{where}: binary_data_size must be a non-negative integer")
            if "data" in inp:
                raise ProtocolError(f"{where}: give either data or binary_data_size, not both")
            expected = byte_size(datatype, shape)
            if expected is not None and size != expected:
                raise ProtocolError(
                    f"{where}: binary_data_size is {size}; {datatype} {list(shape)} "
                    f"needs {expected} bytes"
                )
        elif "data" not in inp:
            raise ProtocolError(f"{where}: no data and no binary_data_size")
        headers.append((name, datatype, shape, size, where))
    check_input_set(signature, [h[0] for h in headers])
    outputs = _parse_requested_outputs(doc.get("outputs"), binary_output, signature)

    needed = sum(h[3] for h in headers if h[3] is not None)
    if needed > len(tail):
        raise ProtocolError(
            f"the binary data is truncated: the inputs declare {needed} bytes after the "
            f"JSON header but the body has {len(tail)}"
        )
    if needed < len(tail):
        raise ProtocolError(
            f"the body has {len(tail) - needed} bytes after the declared binary data"
        )

    # Pass 2: decode.
    inputs, offset = [], 0
    for (name, datatype, shape, size, where), inp in zip(headers, raw_inputs, strict=True):
        if size is not None:
            data = decode_raw(tail[offset : offset + size], datatype, shape, where)
            offset += size
        else:
            data = decode_json(inp["data"], datatype, shape, where)
        inputs.append(InputTensor(name, datatype, shape, data))
    return InferRequest(request_id, tuple(inputs), outputs, parameters)


def _parse_requested_outputs(
    value: Any, binary_output: bool, signature: ModelSignature
) -> tuple[RequestedOutput, ...]:
    if value is None:
        value = []
    if not isinstance(value, list) or not all(isinstance(o, dict) for o in value):
        raise ProtocolError("outputs must be a list of JSON objects")
    requested = []
    for o in value:
        name = o.get("name")
        if not isinstance(name, str):
            raise ProtocolError("every requested output needs a name")
        where = f"output {name!r}"
        params = _object(o.get("parameters"), f"{where}: parameters")
        if any(k in params for k in _SHARED_MEMORY):
            raise ProtocolError(f"{where}: shared memory is not supported by this server")
        requested.append(
            RequestedOutput(
                name,
                binary=_bool(params.get("binary_data"), f"{where}: binary_data", binary_output),
                classification=parse_classification(params.get("classification"), where),
            )
        )
    return resolve_outputs(signature, requested, binary_output)


@dataclass(frozen=True)
class RestResponse:
    """A response body; ``header_length`` is None when the body is plain JSON."""

    body: bytes
    header_length: int | None

    @property
    def content_type(self) -> str:
        return JSON_CONTENT_TYPE if self.header_length is None else BINARY_CONTENT_TYPE

    @property
    def headers(self) -> dict[str, str]:
        """Content-Type and, with binary outputs, Inference-Header-Content-Length."""
        h = {"Content-Type": self.content_type}
        if self.header_length is not None:
            h[INFERENCE_HEADER_CONTENT_LENGTH] = str(self.header_length)
        return h


def build_rest_response(
    request: InferRequest,
    results: Mapping[str, np.ndarray],
    *,
    model_name: str,
    model_version: str,
    signature: ModelSignature = SEEDNET,
) -> RestResponse:
    """The response body for ``request`` given every model output in ``results``."""
    outputs, blobs = [], []
    for t in output_tensors(request, results, signature):
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if t.request.binary:
            raw = encode_raw(t.data, t.datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = to_json_data(t.data, t.datatype)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id:
        doc["id"] = request.id
    doc["outputs"] = outputs
    head = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return RestResponse(head, None)
    return RestResponse(head + b"".join(blobs), len(head))


def error_body(message: str) -> bytes:
    """An error response body in the protocol's shape, ``{"error": "<message>"}``."""
    return json.dumps({"error": message}).encode()
