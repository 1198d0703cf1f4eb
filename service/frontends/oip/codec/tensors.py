"""Tensor datatypes and tensor data as the inference protocol carries them.

The protocol names its datatypes (``UINT8``, ``FP32``, ``BYTES``...) and sends tensor
data three ways: raw little-endian bytes (REST binary tensor extension, gRPC
``raw_input_contents``), JSON lists (REST ``"data"``, possibly nested, row-major) and
typed protobuf lists (gRPC ``contents``). A BYTES element is framed as a 4-byte
little-endian length followed by the bytes, in both raw forms. This module turns all
of them into a numpy array (a list of ``bytes`` for BYTES) with the checks a server
must make, and back; it knows nothing about any model.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from service.errors import ProtocolError

#: Protocol datatype -> numpy dtype (little-endian, as the wire is). BYTES -> object.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

#: Protocol datatype -> the InferTensorContents field that carries it over gRPC.
#: FP16 has no typed field; it must travel as raw contents.
GRPC_CONTENTS_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_LENGTH = struct.Struct("<I")
#: The most dimensions a tensor may have: enough for any model, small enough that a
#: hostile shape list is refused before it is walked (or echoed in an error).
MAX_DIMS = 8
Tensor = np.ndarray | list[bytes]


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a protocol datatype; ProtocolError if there is none."""
    try:
        return NUMPY_DTYPES[datatype]
    except (KeyError, TypeError):
        known = ", ".join(NUMPY_DTYPES)
        raise ProtocolError(f"unsupported datatype {datatype!r}; expected one of {known}") from None


def datatype_of(dtype: np.dtype | type) -> str:
    """The protocol datatype of a numpy dtype (object and bytes dtypes are BYTES)."""
    dt = np.dtype(dtype)
    if dt.kind in "OSU":
        return "BYTES"
    for name, candidate in NUMPY_DTYPES.items():
        if candidate == dt.newbyteorder("<") or candidate == dt:
            return name
    raise ValueError(f"numpy dtype {dt} has no protocol datatype")


def parse_shape(value: Any, where: str) -> tuple[int, ...]:
    """A request's ``shape``: a list of at most :data:`MAX_DIMS` non-negative integers."""
    if isinstance(value, list | tuple) and len(value) > MAX_DIMS:
        raise ProtocolError(f"{where}: shape has {len(value)} dimensions; at most {MAX_DIMS}")
    if not isinstance(value, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise ProtocolError(
            f"{where}: shape must be a list of non-negative integers, got {value!r}"
        )
    return tuple(value)


def element_count(shape: Sequence[int]) -> int:
    """Number of elements of a tensor of this shape (1 for a scalar ``[]``)."""
    return math.prod(shape)


def byte_size(datatype: str, shape: Sequence[int]) -> int | None:
    """Raw size in bytes of a fixed-size tensor; None for BYTES (it depends on the data)."""
    if datatype == "BYTES":
        return None
    return element_count(shape) * numpy_dtype(datatype).itemsize


def serialize_bytes(elements: Iterable[bytes]) -> bytes:
    """BYTES elements framed for the wire: 4-byte LE length, then the bytes, each."""
    parts: list[bytes] = []
    for e in elements:
        parts.append(_LENGTH.pack(len(e)))
        parts.append(e)
    return b"".join(parts)


def deserialize_bytes(buf: bytes | memoryview, count: int, where: str) -> list[bytes]:
    """Exactly ``count`` framed BYTES elements that fill ``buf`` exactly."""
    view = memoryview(buf)
    out: list[bytes] = []
    pos = 0
    while pos < len(view):
        if len(out) == count:  # stop early: a buffer of empty elements could be huge
            raise ProtocolError(f"{where}: BYTES data holds more than the {count} elements")
        if pos + 4 > len(view):
            raise ProtocolError(f"{where}: BYTES data ends inside a 4-byte length prefix")
        (n,) = _LENGTH.unpack_from(view, pos)
        pos += 4
        if pos + n > len(view):
            raise ProtocolError(
                f"{where}: BYTES element {len(out)} declares {n} bytes but only "
                f"{len(view) - pos} remain"
            )
        out.append(bytes(view[pos : pos + n]))
        pos += n
    if len(out) != count:
        raise ProtocolError(
            f"{where}: BYTES data holds {len(out)} elements; the shape needs {count}"
        )
    return out


def decode_raw(buf: bytes | memoryview, datatype: str, shape: Sequence[int], where: str) -> Tensor:
    """Raw little-endian tensor bytes -> a writable array of ``shape`` (list for BYTES)."""
    count = element_count(shape)
    if datatype == "BYTES":
        return deserialize_bytes(buf, count, where)
    dtype = numpy_dtype(datatype)
    expected = count * dtype.itemsize
    if len(buf) != expected:
        raise ProtocolError(
            f"{where}: {len(buf)} bytes of data; {datatype} {list(shape)} needs {expected}"
        )
    array = np.frombuffer(buf, dtype=dtype).reshape(shape)
    if datatype == "BOOL" and array.size and np.frombuffer(buf, np.uint8).max() > 1:
        raise ProtocolError(f"{where}: BOOL bytes must be 0 or 1")
    return array.astype(dtype.newbyteorder("="), copy=True)  # writable, native order


def _flatten(data: list, where: str) -> list:
    """Row-major flattening of nested JSON lists; every level must be all lists or all scalars."""
    level = data
    while level and isinstance(level[0], list):
        if not all(isinstance(x, list) for x in level):
            raise ProtocolError(f"{where}: data mixes lists and values at the same depth")
        level = [y for x in level for y in x]
    if any(isinstance(x, list) for x in level):
        raise ProtocolError(f"{where}: data mixes lists and values at the same depth")
    return level


_INT_TYPES = {int}
_FLOAT_TYPES = {int, float}


def decode_json(data: Any, datatype: str, shape: Sequence[int], where: str) -> Tensor:
    """REST ``"data"`` (flat or nested, row-major) -> array of ``shape`` (list for BYTES).

    Numbers must be JSON numbers (``true``/``"1"`` are refused), integers must be
    integral and in range, BOOL takes ``true``/``false``, BYTES takes strings (sent UTF-8).
    """
    dtype = numpy_dtype(datatype)
    if not isinstance(data, list):
        raise ProtocolError(f"{where}: data must be a JSON array")
    flat = _flatten(data, where)
    count = element_count(shape)
    if len(flat) != count:
        raise ProtocolError(
            f"{where}: data has {len(flat)} elements but shape {list(shape)} needs {count}"
        )
    types = {type(v) for v in flat}
    if datatype == "BYTES":
        if not types <= {str}:
            raise ProtocolError(f"{where}: BYTES data must be JSON strings")
        return [v.encode("utf-8") for v in flat]
    if datatype == "BOOL":
        if not types <= {bool}:
            raise ProtocolError(f"{where}: BOOL data must be true or false")
        return np.array(flat, dtype=np.bool_).reshape(shape)
    if dtype.kind in "iu":
        if not types <= _INT_TYPES:
            raise ProtocolError(f"{where}: {datatype} data must be JSON integers")
        info = np.iinfo(dtype)
        if flat and (min(flat) < info.min or max(flat) > info.max):
            raise ProtocolError(f"{where}: {datatype} data out of range [{info.min}, {info.max}]")
    elif not types <= _FLOAT_TYPES:
        raise ProtocolError(f"{where}: {datatype} data must be JSON numbers")
    return np.array(flat, dtype=dtype.newbyteorder("=")).reshape(shape)


def decode_grpc_contents(
    values: Sequence[Any], datatype: str, shape: Sequence[int], where: str
) -> Tensor:
    """The typed list of a gRPC ``InferTensorContents`` field -> array of ``shape``."""
    count = element_count(shape)
    if len(values) != count:
        raise ProtocolError(
            f"{where}: contents have {len(values)} elements but shape {list(shape)} needs {count}"
        )
    if datatype == "BYTES":
        return [bytes(v) for v in values]
    dtype = numpy_dtype(datatype)
    wide = np.array(list(values))  # int64/uint64/float32/float64/bool, as protobuf typed them
    if dtype.kind in "iu" and wide.size:
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise ProtocolError(f"{where}: {datatype} contents out of range")
    return wide.astype(dtype.newbyteorder("=")).reshape(shape)


def encode_raw(value: Tensor, datatype: str) -> bytes:
    """A tensor's raw wire bytes: little-endian, row-major; BYTES framed per element."""
    if datatype == "BYTES":
        flat = np.asarray(value, dtype=object).reshape(-1)
        return serialize_bytes(v if isinstance(v, bytes) else str(v).encode() for v in flat)
    dtype = numpy_dtype(datatype)
    return np.ascontiguousarray(value, dtype=dtype).tobytes()


def to_json_data(value: Tensor, datatype: str) -> list:
    """A tensor's flat, row-major REST ``"data"`` list (BYTES elements as UTF-8 strings)."""
    if datatype == "BYTES":
        flat = np.asarray(value, dtype=object).reshape(-1)
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in flat]
    return np.asarray(value, dtype=numpy_dtype(datatype)).reshape(-1).tolist()
