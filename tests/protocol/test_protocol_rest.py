"""REST bodies: requests built and responses decoded by the real tritonclient.http."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from oip_helpers import MAX_BATCH, http_body, http_input, images, model_results

from service.errors import ProtocolError
from service.frontends.oip.codec.rest import (
    INFERENCE_HEADER_CONTENT_LENGTH,
    build_rest_response,
    error_body,
    parse_header_length,
    parse_rest_request,
)
from service.frontends.oip.codec.signature import CIFAR10_LABELS
from service.frontends.oip.codec.tensors import serialize_bytes

FILES = [b"\xff\xd8\xff\xe0 a jpeg \x00\x00", b"\x89PNG\r\n\x1a\n\x00 a png", b""]


def parse(body, header_length=None, max_batch_size=MAX_BATCH):
    return parse_rest_request(body, header_length, max_batch_size=max_batch_size)


def respond(request, results):
    return build_rest_response(request, results, model_name="seednet", model_version="3")


def client_result(response):
    return httpclient.InferenceServerClient.parse_response_body(
        response.body, header_length=response.header_length
    )


def expected_classes(probs: np.ndarray, k: int) -> list[list[bytes]]:
    """Triton's top-k strings, computed independently of the code under test."""
    rows = []
    for row in probs:
        order = sorted(range(len(row)), key=lambda i: (-float(row[i]), i))[:k]
        rows.append([b"%f:%d:%s" % (row[i], i, CIFAR10_LABELS[i].encode()) for i in order])
    return rows


# --- requests -------------------------------------------------------------------------


def test_binary_images_round_trip_exactly(rng):
    pixels = images(rng, 5)
    body, json_size = http_body([http_input("images", pixels, "UINT8")], request_id="req-7")
    assert json_size is not None
    req = parse(body, json_size)
    assert req.id == "req-7"
    assert req.batch_size == 5 and req.image_bytes is None
    assert req.images.dtype == np.uint8 and req.images.flags.writeable
    np.testing.assert_array_equal(req.images, pixels)


def test_json_images_round_trip_exactly(rng):
    pixels = images(rng, 2)
    body, json_size = http_body([http_input("images", pixels, "UINT8", binary=False)])
    assert json_size is None
    req = parse(body, None)
    np.testing.assert_array_equal(req.images, pixels)
    assert req.id == ""


@pytest.mark.parametrize("shape", [[3], [3, 1]])
def test_binary_image_bytes_in_both_accepted_shapes(shape):
    arr = np.array(FILES, dtype=object).reshape(shape)
    body, json_size = http_body([http_input("image_bytes", arr, "BYTES")])
    req = parse(body, json_size)
    assert req.image_bytes == FILES
    assert req.images is None and req.batch_size == 3


def test_json_image_bytes_are_utf8_strings():
    arr = np.array([b"abc", "é".encode()], dtype=object)
    body, json_size = http_body([http_input("image_bytes", arr, "BYTES", binary=False)])
    assert json_size is None
    assert parse(body).image_bytes == [b"abc", "é".encode()]


def test_nested_json_data_is_row_major(rng):
    pixels = images(rng, 2)
    doc = {"inputs": [{"name": "images", "shape": [2, 3, 32, 32], "datatype": "UINT8"}]}
    doc["inputs"][0]["data"] = pixels.tolist()
    np.testing.assert_array_equal(parse(json.dumps(doc).encode()).images, pixels)


def test_outputs_default_to_all_and_to_binary_with_tritonclient(rng):
    # tritonclient sets "binary_data_output": true when it names no outputs
    body, json_size = http_body([http_input("images", images(rng, 2), "UINT8")])
    req = parse(body, json_size)
    assert [(o.name, o.binary, o.classification) for o in req.outputs] == [
        ("probabilities", True, 0),
        ("attention", True, 0),
    ]
    results = model_results(rng, 2)
    resp = respond(req, results)
    assert resp.header_length is not None
    assert resp.headers == {
        "Content-Type": "application/octet-stream",
        INFERENCE_HEADER_CONTENT_LENGTH: str(resp.header_length),
    }
    result = client_result(resp)
    for name, value in results.items():
        out = result.as_numpy(name)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, value)
    doc = result.get_response()
    assert doc["model_name"] == "seednet" and doc["model_version"] == "3" and "id" not in doc
    assert [o["name"] for o in doc["outputs"]] == ["probabilities", "attention"]


def test_json_response_when_no_output_is_binary(rng):
    outputs = [
        httpclient.InferRequestedOutput("attention", binary_data=False),
        httpclient.InferRequestedOutput("probabilities", binary_data=False),
    ]
    body, json_size = http_body(
        [http_input("images", images(rng, 3), "UINT8")], outputs=outputs, request_id="j"
    )
    results = model_results(rng, 3)
    resp = respond(parse(body, json_size), results)
    assert resp.header_length is None
    assert resp.headers == {"Content-Type": "application/json"}
    doc = json.loads(resp.body)
    assert [o["name"] for o in doc["outputs"]] == ["attention", "probabilities"]  # asked order
    assert doc["id"] == "j"
    assert doc["outputs"][0] == {
        "name": "attention",
        "datatype": "FP32",
        "shape": [3, 7, 2],
        "data": results["attention"].reshape(-1).tolist(),
    }
    result = client_result(resp)
    for name, value in results.items():  # float32 survives the JSON round trip exactly
        np.testing.assert_array_equal(result.as_numpy(name), value)


def test_binary_data_output_parameter_with_a_per_output_override(rng):
    doc = {
        "parameters": {"binary_data_output": True},
        "inputs": [{"name": "images", "shape": [1, 3, 32, 32], "datatype": "UINT8"}],
        "outputs": [
            {"name": "attention", "parameters": {"binary_data": False}},
            {"name": "probabilities"},
        ],
    }
    doc["inputs"][0]["data"] = images(rng, 1).reshape(-1).tolist()
    req = parse(json.dumps(doc).encode())
    assert [(o.name, o.binary) for o in req.outputs] == [
        ("attention", False),
        ("probabilities", True),
    ]
    assert req.parameters == {"binary_data_output": True}
    results = model_results(rng, 1)
    resp = respond(req, results)
    head = json.loads(resp.body[: resp.header_length])
    assert "data" in head["outputs"][0]
    assert head["outputs"][1]["parameters"] == {"binary_data_size": 40}
    assert len(resp.body) == resp.header_length + 40
    result = client_result(resp)
    for name, value in results.items():
        np.testing.assert_array_equal(result.as_numpy(name), value)


@pytest.mark.parametrize("binary", [True, False])
def test_classification_extension(rng, binary):
    outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)]
    body, json_size = http_body([http_input("images", images(rng, 4), "UINT8")], outputs=outputs)
    req = parse(body, json_size)
    results = model_results(rng, 4)
    results["probabilities"][1, [2, 5]] = 0.75  # a tie: the lower index comes first
    resp = respond(req, results)
    assert (resp.header_length is not None) == binary
    doc = json.loads(resp.body[: resp.header_length] if binary else resp.body)
    assert [(o["name"], o["datatype"], o["shape"]) for o in doc["outputs"]] == [
        ("probabilities", "BYTES", [4, 3])
    ]
    got = client_result(resp).as_numpy("probabilities")
    assert got.shape == (4, 3)
    want = expected_classes(results["probabilities"], 3)
    assert [[bytes(x) if binary else x.encode() for x in row] for row in got.tolist()] == want
    assert want[1][:2] == [b"0.750000:2:bird", b"0.750000:5:dog"]


def test_classification_count_over_the_number_of_classes_returns_all(rng):
    outputs = [httpclient.InferRequestedOutput("probabilities", class_count=25)]
    body, json_size = http_body([http_input("images", images(rng, 2), "UINT8")], outputs=outputs)
    results = model_results(rng, 2)
    got = client_result(respond(parse(body, json_size), results)).as_numpy("probabilities")
    assert got.shape == (2, 10)
    assert got.tolist() == expected_classes(results["probabilities"], 10)


def test_header_length_parsing():
    assert parse_header_length(None) is None
    assert parse_header_length(" 12 ") == 12
    for bad in ("x", "1.5", "-1"):
        with pytest.raises(ProtocolError, match=INFERENCE_HEADER_CONTENT_LENGTH):
            parse_header_length(bad)


def test_header_length_zero_means_all_json(rng):
    body, _ = http_body([http_input("images", images(rng, 1), "UINT8", binary=False)])
    assert parse(body, 0).batch_size == 1


def test_error_body_is_what_tritonclient_reads():
    assert json.loads(error_body("bad input")) == {"error": "bad input"}


def test_model_result_with_the_wrong_shape_is_a_server_error(rng):
    body, json_size = http_body([http_input("images", images(rng, 2), "UINT8")])
    results = model_results(rng, 3)
    with pytest.raises(ValueError, match="expected \\[2, 10\\]"):
        respond(parse(body, json_size), results)


# --- every way to get a request wrong --------------------------------------------------


def _json_body(inputs, **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def _img_json(n=1, **overrides):
    entry = {"name": "images", "shape": [n, 3, 32, 32], "datatype": "UINT8"}
    entry["data"] = [0] * (n * 3072)
    entry.update(overrides)
    return entry


def test_unknown_input_name(rng):
    body, size = http_body([http_input("pixels", images(rng, 1), "UINT8")])
    with pytest.raises(ProtocolError, match="unknown input 'pixels'; .*images, image_bytes"):
        parse(body, size)


def test_wrong_datatype(rng):
    arr = images(rng, 1).astype(np.float32)
    body, size = http_body([http_input("images", arr, "FP32")])
    with pytest.raises(ProtocolError, match="input 'images' has datatype 'FP32'; it must be UINT8"):
        parse(body, size)


def test_shape_does_not_match_json_element_count():
    body = _json_body([_img_json(2, data=[0] * 3072)])
    with pytest.raises(ProtocolError, match="data has 3072 elements but shape .* needs 6144"):
        parse(body)


def test_binary_data_size_does_not_match_the_shape(rng):
    body, size = http_body([http_input("images", images(rng, 1), "UINT8")])
    head = json.loads(body[:size])
    head["inputs"][0]["parameters"]["binary_data_size"] = 3000
    new_head = json.dumps(head).encode()
    with pytest.raises(ProtocolError, match="binary_data_size is 3000; .* needs 3072 bytes"):
        parse(new_head + body[size:], len(new_head))


def test_bytes_framing_does_not_match_the_shape():
    raw = serialize_bytes([b"one file"])
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "image_bytes",
                    "shape": [2],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    with pytest.raises(ProtocolError, match="holds 1 elements; the shape needs 2"):
        parse(head + raw, len(head))


def test_truncated_binary_body(rng):
    body, size = http_body([http_input("images", images(rng, 2), "UINT8")])
    with pytest.raises(ProtocolError, match="truncated: the inputs declare 6144 bytes .* has 6134"):
        parse(body[:-10], size)


def test_header_length_larger_than_the_body(rng):
    body, _ = http_body([http_input("images", images(rng, 1), "UINT8")])
    with pytest.raises(ProtocolError, match=f"is {len(body) + 1} but the body has only"):
        parse(body, len(body) + 1)


def test_bytes_after_the_declared_binary_data(rng):
    body, size = http_body([http_input("images", images(rng, 1), "UINT8")])
    with pytest.raises(ProtocolError, match="3 bytes after the declared binary data"):
        parse(body + b"xyz", size)


def test_batch_over_the_per_request_limit(rng):
    body, size = http_body([http_input("images", images(rng, MAX_BATCH + 1), "UINT8")])
    with pytest.raises(ProtocolError, match=f"holds {MAX_BATCH + 1} items; at most {MAX_BATCH}"):
        parse(body, size)
    assert parse(body, size, max_batch_size=MAX_BATCH + 1).batch_size == MAX_BATCH + 1


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (2, 3, 64, 64), (3, 32, 32), (2, 1, 3, 32, 32)])
def test_images_shape_must_be_n_3_32_32(rng, shape):
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    body, size = http_body([http_input("images", arr, "UINT8")])
    with pytest.raises(ProtocolError, match="it must be \\[N, 3, 32, 32\\]"):
        parse(body, size)


def test_image_bytes_shape_must_be_n_or_n_1():
    arr = np.array([[b"a", b"b"], [b"c", b"d"]], dtype=object)
    body, size = http_body([http_input("image_bytes", arr, "BYTES")])
    with pytest.raises(ProtocolError, match="it must be \\[N, 1\\] or \\[N\\]"):
        parse(body, size)


def test_empty_batch():
    body = _json_body([_img_json(0, data=[])])
    with pytest.raises(ProtocolError, match="empty batch"):
        parse(body)


def test_both_inputs(rng):
    body, size = http_body(
        [
            http_input("images", images(rng, 1), "UINT8"),
            http_input("image_bytes", np.array([b"x"], dtype=object), "BYTES"),
        ]
    )
    with pytest.raises(ProtocolError, match="exactly one input, 'images' or 'image_bytes'; got"):
        parse(body, size)


def test_neither_input():
    with pytest.raises(ProtocolError, match="exactly one input, .*; got none"):
        parse(_json_body([]))


def test_the_same_input_twice():
    with pytest.raises(ProtocolError, match="given more than once"):
        parse(_json_body([_img_json(), _img_json()]))


def test_non_numeric_json_data():
    with pytest.raises(ProtocolError, match="UINT8 data must be JSON integers"):
        parse(_json_body([_img_json(data=["0"] * 3072)]))


def test_ragged_nested_json_data():
    data = [[[[0] * 32] * 32] * 3]
    data[0][0] = [0] * 1024  # one channel flattened, the others nested
    with pytest.raises(ProtocolError, match="mixes lists and values"):
        parse(_json_body([_img_json(data=data)]))


def test_unknown_requested_output(rng):
    body, size = http_body(
        [http_input("images", images(rng, 1), "UINT8")],
        outputs=[httpclient.InferRequestedOutput("logits")],
    )
    with pytest.raises(ProtocolError, match="unknown output 'logits'; .*probabilities, attention"):
        parse(body, size)


def test_the_same_output_twice(rng):
    outputs = [httpclient.InferRequestedOutput("attention")] * 2
    body, size = http_body([http_input("images", images(rng, 1), "UINT8")], outputs=outputs)
    with pytest.raises(ProtocolError, match="requested more than once"):
        parse(body, size)


def test_shared_memory_is_refused(rng):
    i = httpclient.InferInput("images", [1, 3, 32, 32], "UINT8")
    i.set_shared_memory("region", 3072)
    body, size = http_body([i])
    with pytest.raises(ProtocolError, match="shared memory is not supported"):
        parse(body, size)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"inputs": {}}', "inputs must be a list"),
        (_json_body([_img_json()], id=7), "id must be a string"),
        (_json_body([_img_json()], parameters=[]), "parameters must be a JSON object"),
        (
            _json_body([_img_json()], parameters={"binary_data_output": "yes"}),
            "binary_data_output must be true or false",
        ),
        (_json_body([_img_json(shape=None)]), "shape must be a list of non-negative integers"),
        (
            _json_body([_img_json(parameters={"binary_data_size": 3072})]),
            "either data or binary_data_size, not both",
        ),
        (
            _json_body([{"name": "images", "shape": [1, 3, 32, 32], "datatype": "UINT8"}]),
            "no data and no binary_data_size",
        ),
        (_json_body([_img_json()], outputs=[{"parameters": {}}]), "needs a name"),
        (
            _json_body(
                [_img_json()], outputs=[{"name": "attention", "parameters": {"binary_data": 1}}]
            ),
            "binary_data must be true or false",
        ),
    ],
)
def test_malformed_requests(body, message):
    with pytest.raises(ProtocolError, match=message):
        parse(body)


@pytest.mark.parametrize("count", [-1, "3", True, 2.0])
def test_bad_classification_count(count):
    outputs = [{"name": "probabilities", "parameters": {"classification": count}}]
    with pytest.raises(ProtocolError, match="classification must be a non-negative integer"):
        parse(_json_body([_img_json()], outputs=outputs))
