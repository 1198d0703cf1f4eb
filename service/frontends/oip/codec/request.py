"""The neutral inference request both front ends produce, and its checks.

REST and gRPC carry the same request in different clothes; both parsers end here, so
the service handles one object and the signature checks (names, datatypes, shapes,
batch limit, exactly one input, known outputs) live in one place. Checks that need
no tensor data run before any data is decoded, so an oversized or misnamed tensor
is refused before its bytes are touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import ProtocolError
from service.frontends.oip.codec.signature import ModelSignature, TensorSpec
from service.frontends.oip.codec.tensors import Tensor


@dataclass(frozen=True)
class InputTensor:
    """A decoded input: ``data`` is a numpy array of ``shape``, or a list of bytes for BYTES."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Tensor


@dataclass(frozen=True)
class RequestedOutput:
    """An output to return: as binary data (REST only) and/or as top-``classification``."""

    name: str
    binary: bool = False
    classification: int = 0


@dataclass(frozen=True)
class InferRequest:
    """A validated inference request. ``outputs`` is never empty: when the client named
    none, it holds every model output with the request's default binary setting."""

    id: str
    inputs: tuple[InputTensor, ...]
    outputs: tuple[RequestedOutput, ...]
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.inputs[0].shape[0]

    def _input(self, name: str) -> InputTensor | None:
        return next((t for t in self.inputs if t.name == name), None)

    @property
    def images(self) -> np.ndarray | None:
        """UINT8 ``[N, 3, 32, 32]`` when the request used ``images``, else None."""
        t = self._input("images")
        return None if t is None else t.data  # type: ignore[return-value]

    @property
    def image_bytes(self) -> list[bytes] | None:
        """N encoded image files when the request used ``image_bytes``, else None."""
        t = self._input("image_bytes")
        return None if t is None else list(t.data)


def check_input_header(
    signature: ModelSignature,
    name: Any,
    datatype: Any,
    shape: tuple[int, ...],
    max_batch_size: int,
) -> TensorSpec:
    """Name, datatype, shape and batch size of one input, before its data is read."""
    spec = signature.input(name) if isinstance(name, str) else None
    if spec is None:
        expected = ", ".join(signature.input_names)
        raise ProtocolError(f"unknown input {name!r}; this model takes one of: {expected}")
    if datatype != spec.datatype:
        raise ProtocolError(f"input {name!r} has datatype {datatype!r}; it must be {spec.datatype}")
    if len(shape) < 1 or tuple(shape[1:]) not in spec.accepted_dims:
        raise ProtocolError(
            f"input {name!r} has shape {list(shape)}; it must be {spec.wire_shape()}"
        )
    n = shape[0]
    if n < 1:
        raise ProtocolError(f"input {name!r} has an empty batch (N = 0)")
    if n > max_batch_size:
        raise ProtocolError(f"input {name!r} holds {n} items; at most {max_batch_size} per request")
    return spec


def check_input_set(signature: ModelSignature, names: Sequence[str]) -> None:
    """Exactly one of the model's (alternative) inputs, named once."""
    if len(set(names)) != len(names):
        raise ProtocolError(f"an input is given more than once: {list(names)}")
    if len(names) != 1:
        expected = " or ".join(repr(n) for n in signature.input_names)
        got = "none" if not names else ", ".join(repr(n) for n in names)
        raise ProtocolError(f"give exactly one input, {expected}; got {got}")


def parse_classification(value: Any, where: str) -> int:
    """The ``classification`` parameter: a non-negative integer (0: not requested)."""
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{where}: classification must be a non-negative integer")
    return value


def resolve_outputs(
    signature: ModelSignature,
    requested: Sequence[RequestedOutput] | None,
    default_binary: bool,
) -> tuple[RequestedOutput, ...]:
    """The outputs to return: the requested ones (known, each once) or all of them."""
    if not requested:
        return tuple(RequestedOutput(n, binary=default_binary) for n in signature.output_names)
    seen: set[str] = set()
    for out in requested:
        if signature.output(out.name) is None:
            expected = ", ".join((*signature.output_names, *signature.on_request_names))
            raise ProtocolError(f"unknown output {out.name!r}; this model has: {expected}")
        if out.name in seen:
            raise ProtocolError(f"output {out.name!r} is requested more than once")
        seen.add(out.name)
    return tuple(requested)
