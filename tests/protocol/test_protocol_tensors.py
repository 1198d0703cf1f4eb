"""Datatypes, BYTES framing and tensor decoding, checked against tritonclient.utils."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.utils import (
    deserialize_bytes_tensor,
    np_to_triton_dtype,
    serialize_byte_tensor,
    triton_to_np_dtype,
)

from service.errors import ProtocolError
from service.frontends.oip.codec.tensors import (
    NUMPY_DTYPES,
    byte_size,
    datatype_of,
    decode_grpc_contents,
    decode_json,
    decode_raw,
    deserialize_bytes,
    encode_raw,
    numpy_dtype,
    parse_shape,
    serialize_bytes,
    to_json_data,
)

ELEMENTS = [b"", b"\x00\x01\xff", b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "é".encode()]


@pytest.mark.parametrize("datatype", [d for d in NUMPY_DTYPES if d != "BYTES"])
def test_datatype_table_agrees_with_tritonclient(datatype):
    assert numpy_dtype(datatype) == np.dtype(triton_to_np_dtype(datatype))
    assert datatype_of(numpy_dtype(datatype)) == datatype
    assert np_to_triton_dtype(numpy_dtype(datatype)) == datatype


def test_bytes_datatype():
    assert numpy_dtype("BYTES") == np.dtype(object)
    assert datatype_of(np.dtype(object)) == "BYTES"
    assert byte_size("BYTES", [3]) is None
    assert byte_size("FP32", [2, 3]) == 24


def test_unknown_datatype_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="unsupported datatype 'FLOAT'"):
        numpy_dtype("FLOAT")


def test_bytes_framing_matches_tritonclient():
    ours = serialize_bytes(ELEMENTS)
    theirs = serialize_byte_tensor(np.array(ELEMENTS, dtype=object)).item()
    assert ours == theirs
    assert deserialize_bytes(theirs, len(ELEMENTS), "x") == ELEMENTS
    assert list(deserialize_bytes_tensor(ours)) == ELEMENTS


@pytest.mark.parametrize(
    ("buf", "count", "message"),
    [
        (b"\x05\x00\x00", 1, "inside a 4-byte length prefix"),
        (b"\x05\x00\x00\x00abc", 1, "declares 5 bytes but only 3 remain"),
        (serialize_bytes([b"a", b"b"]), 3, "holds 2 elements; the shape needs 3"),
        (serialize_bytes([b"a", b"b"]) + b"\x00", 2, "more than the 2 elements"),
        (serialize_bytes([b""] * 1000), 2, "more than the 2 elements"),
    ],
)
def test_bad_bytes_framing(buf, count, message):
    with pytest.raises(ProtocolError, match=message):
        deserialize_bytes(buf, count, "input 'image_bytes'")


def test_decode_raw_round_trip_and_writable():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out = decode_raw(a.tobytes(), "FP32", (2, 3, 4), "x")
    assert out.dtype == np.float32 and out.flags.writeable
    np.testing.assert_array_equal(out, a)
    assert encode_raw(out, "FP32") == a.tobytes()


def test_decode_raw_byte_count_mismatch():
    with pytest.raises(ProtocolError, match="11 bytes of data; UINT8 \\[3, 4\\] needs 12"):
        decode_raw(bytes(11), "UINT8", (3, 4), "x")


def test_decode_raw_bool_must_be_0_or_1():
    assert decode_raw(b"\x00\x01", "BOOL", (2,), "x").tolist() == [False, True]
    with pytest.raises(ProtocolError, match="BOOL bytes must be 0 or 1"):
        decode_raw(b"\x00\x02", "BOOL", (2,), "x")


def test_json_nested_data_is_flattened_row_major():
    nested = [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]
    flat = list(range(1, 9))
    a = decode_json(nested, "UINT8", (2, 2, 2), "x")
    b = decode_json(flat, "UINT8", (2, 2, 2), "x")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, np.array(nested, dtype=np.uint8))
    # any nesting that flattens to the right count is row-major data
    np.testing.assert_array_equal(
        decode_json([[1, 2, 3, 4], [5, 6, 7, 8]], "UINT8", (2, 2, 2), "x"), a
    )


@pytest.mark.parametrize(
    ("data", "datatype", "shape", "message"),
    [
        ([1, 2, 3], "UINT8", (2, 2), "data has 3 elements but shape \\[2, 2\\] needs 4"),
        ([[1, 2], 3, 4], "UINT8", (2, 2), "mixes lists and values"),
        ([[1, 2], [3, [4]]], "UINT8", (4,), "mixes lists and values"),
        ([1, "2"], "UINT8", (2,), "UINT8 data must be JSON integers"),
        ([1, True], "UINT8", (2,), "UINT8 data must be JSON integers"),
        ([1, 2.5], "UINT8", (2,), "UINT8 data must be JSON integers"),
        ([1, None], "FP32", (2,), "FP32 data must be JSON numbers"),
        ([1.0, "nan"], "FP32", (2,), "FP32 data must be JSON numbers"),
        ([0, 256], "UINT8", (2,), "out of range \\[0, 255\\]"),
        ([-1, 0], "UINT8", (2,), "out of range"),
        ([1, 0], "BOOL", (2,), "BOOL data must be true or false"),
        ([b"x"], "BYTES", (1,), "BYTES data must be JSON strings"),
        ({"a": 1}, "UINT8", (1,), "data must be a JSON array"),
    ],
)
def test_bad_json_data(data, datatype, shape, message):
    with pytest.raises(ProtocolError, match=message):
        decode_json(data, datatype, shape, "input 'x'")


def test_json_numbers_bool_and_strings():
    np.testing.assert_array_equal(
        decode_json([1, 2.5], "FP32", (2,), "x"), np.array([1, 2.5], np.float32)
    )
    assert decode_json([True, False], "BOOL", (2,), "x").tolist() == [True, False]
    assert decode_json(["a", "é"], "BYTES", (2,), "x") == [b"a", "é".encode()]


def test_parse_shape():
    assert parse_shape([2, 3], "x") == (2, 3)
    for bad in ([-1, 3], [2.0], "2,3", None, [True]):
        with pytest.raises(ProtocolError, match="shape must be a list of non-negative integers"):
            parse_shape(bad, "x")


def test_grpc_contents():
    np.testing.assert_array_equal(
        decode_grpc_contents([1, 2, 3, 4], "UINT8", (2, 2), "x"),
        np.array([[1, 2], [3, 4]], np.uint8),
    )
    with pytest.raises(ProtocolError, match="contents have 3 elements"):
        decode_grpc_contents([1, 2, 3], "UINT8", (2, 2), "x")
    with pytest.raises(ProtocolError, match="out of range"):
        decode_grpc_contents([1, 256], "UINT8", (2,), "x")


def test_to_json_data():
    assert to_json_data(np.array([[1.5, 2]], np.float32), "FP32") == [1.5, 2.0]
    assert to_json_data(np.array([b"a:1", b"b"], dtype=object), "BYTES") == ["a:1", "b"]
