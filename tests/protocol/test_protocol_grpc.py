"""gRPC messages: requests built and responses decoded by the real tritonclient.grpc.

tritonclient.grpc has its own generated ``inference.*`` classes; messages cross between
its classes and ours through their wire bytes, exactly as they do over a network. The
last tests run our generated service on a loopback gRPC server and talk to it with
tritonclient.grpc.InferenceServerClient.
"""

from __future__ import annotations

from concurrent import futures

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from oip_helpers import MAX_BATCH, images, model_results
from tritonclient.grpc import model_config_pb2 as triton_config_pb
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc._utils import _get_inference_request
from tritonclient.utils import InferenceServerException

from service.errors import ProtocolError
from service.frontends.oip.codec import grpc_predict_v2_pb2 as pb
from service.frontends.oip.codec import grpc_predict_v2_pb2_grpc as pb_grpc
from service.frontends.oip.codec.grpc_codec import (
    build_grpc_response,
    model_config_response,
    model_metadata_response,
    parse_grpc_request,
    server_metadata_response,
)
from service.frontends.oip.codec.metadata import model_config, model_metadata, server_metadata
from service.frontends.oip.codec.signature import CIFAR10_LABELS

FILES = [b"\xff\xd8\xff\xe0 a jpeg \x00\x00", b"\x89PNG\r\n\x1a\n\x00 a png"]


def grpc_input(name, array, datatype):
    i = grpcclient.InferInput(name, list(array.shape), datatype)
    i.set_data_from_numpy(array)
    return i


def triton_request(inputs, outputs=None, request_id="", parameters=None) -> pb.ModelInferRequest:
    """A ModelInferRequest as tritonclient.grpc builds it, read back as our message."""
    msg = _get_inference_request(
        model_name="seednet",
        inputs=inputs,
        model_version="",
        request_id=request_id,
        outputs=outputs,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        parameters=parameters,
    )
    return pb.ModelInferRequest.FromString(msg.SerializeToString())


def parse(msg, max_batch_size=MAX_BATCH):
    return parse_grpc_request(msg, max_batch_size=max_batch_size)


def client_result(response: pb.ModelInferResponse) -> grpcclient.InferResult:
    wire = triton_pb.ModelInferResponse.FromString(response.SerializeToString())
    return grpcclient.InferResult(wire)


def respond(request, results):
    return build_grpc_response(request, results, model_name="seednet", model_version="3")


def test_raw_images_round_trip_exactly(rng):
    pixels = images(rng, 4)
    msg = triton_request([grpc_input("images", pixels, "UINT8")], request_id="g1")
    assert len(msg.raw_input_contents) == 1 and msg.model_name == "seednet"
    req = parse(msg)
    assert req.id == "g1" and req.batch_size == 4
    np.testing.assert_array_equal(req.images, pixels)
    assert req.images.flags.writeable
    assert [(o.name, o.classification) for o in req.outputs] == [
        ("probabilities", 0),
        ("attention", 0),
    ]


@pytest.mark.parametrize("shape", [[2], [2, 1]])
def test_raw_image_bytes(shape):
    arr = np.array(FILES, dtype=object).reshape(shape)
    req = parse(triton_request([grpc_input("image_bytes", arr, "BYTES")]))
    assert req.image_bytes == FILES


def test_typed_contents(rng):
    pixels = images(rng, 2)
    msg = pb.ModelInferRequest(model_name="seednet")
    t = msg.inputs.add(name="images", datatype="UINT8", shape=[2, 3, 32, 32])
    t.contents.uint_contents.extend(pixels.reshape(-1).tolist())
    np.testing.assert_array_equal(parse(msg).images, pixels)

    msg = pb.ModelInferRequest(model_name="seednet")
    t = msg.inputs.add(name="image_bytes", datatype="BYTES", shape=[2])
    t.contents.bytes_contents.extend(FILES)
    assert parse(msg).image_bytes == FILES


def test_response_decodes_with_tritonclient(rng):
    outputs = [
        grpcclient.InferRequestedOutput("attention"),
        grpcclient.InferRequestedOutput("probabilities"),
    ]
    msg = triton_request([grpc_input("images", images(rng, 3), "UINT8")], outputs, request_id="r")
    results = model_results(rng, 3)
    resp = respond(parse(msg), results)
    assert resp.id == "r" and resp.model_name == "seednet" and resp.model_version == "3"
    assert [o.name for o in resp.outputs] == ["attention", "probabilities"]
    assert len(resp.raw_output_contents) == 2
    result = client_result(resp)
    for name, value in results.items():
        out = result.as_numpy(name)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, value)


def test_classification_over_grpc(rng):
    outputs = [
        grpcclient.InferRequestedOutput("probabilities", class_count=2),
        grpcclient.InferRequestedOutput("attention"),
    ]
    msg = triton_request([grpc_input("images", images(rng, 2), "UINT8")], outputs)
    req = parse(msg)
    assert req.outputs[0].classification == 2
    results = model_results(rng, 2)
    resp = respond(req, results)
    assert resp.outputs[0].datatype == "BYTES" and list(resp.outputs[0].shape) == [2, 2]
    got = client_result(resp).as_numpy("probabilities")
    for row, probs in zip(got, results["probabilities"], strict=True):
        top = np.argsort(-probs, kind="stable")[:2]
        assert [bytes(x) for x in row] == [
            f"{probs[i]:f}:{i}:{CIFAR10_LABELS[i]}".encode() for i in top
        ]
    np.testing.assert_array_equal(client_result(resp).as_numpy("attention"), results["attention"])


def test_request_parameters_are_passed_through(rng):
    msg = triton_request(
        [grpc_input("images", images(rng, 1), "UINT8")], parameters={"tag": "a", "n": 3, "b": True}
    )
    assert parse(msg).parameters == {"tag": "a", "n": 3, "b": True}


# --- refused requests -----------------------------------------------------------------


def test_unknown_input(rng):
    with pytest.raises(ProtocolError, match="unknown input 'pixels'"):
        parse(triton_request([grpc_input("pixels", images(rng, 1), "UINT8")]))


def test_wrong_datatype(rng):
    arr = images(rng, 1).astype(np.int32)
    with pytest.raises(ProtocolError, match="datatype 'INT32'; it must be UINT8"):
        parse(triton_request([grpc_input("images", arr, "INT32")]))


def test_raw_byte_count_mismatch(rng):
    msg = triton_request([grpc_input("images", images(rng, 1), "UINT8")])
    msg.raw_input_contents[0] = msg.raw_input_contents[0][:-1]
    with pytest.raises(
        ProtocolError, match="3071 bytes of data; UINT8 \\[1, 3, 32, 32\\] needs 3072"
    ):
        parse(msg)


def test_raw_bytes_framing_mismatch():
    msg = triton_request([grpc_input("image_bytes", np.array(FILES, dtype=object), "BYTES")])
    msg.raw_input_contents[0] = msg.raw_input_contents[0][:-3]
    with pytest.raises(ProtocolError, match="declares .* bytes but only"):
        parse(msg)


def test_raw_contents_count_must_match_inputs(rng):
    msg = triton_request([grpc_input("images", images(rng, 1), "UINT8")])
    msg.raw_input_contents.append(b"")
    with pytest.raises(ProtocolError, match="2 entries for 1 inputs"):
        parse(msg)


def test_raw_and_typed_contents_together(rng):
    msg = triton_request([grpc_input("images", images(rng, 1), "UINT8")])
    msg.inputs[0].contents.uint_contents.append(1)
    with pytest.raises(ProtocolError, match="contents must be empty"):
        parse(msg)


def test_model_config_response_reads_as_tritons_own_message():
    """Our subset of Triton's ModelConfig keeps its field numbers: Triton's classes read it."""
    ours = model_config_response(model_config("seednet", "pytorch_libtorch", MAX_BATCH, 2000))
    config = triton_pb.ModelConfigResponse.FromString(ours.SerializeToString()).config
    assert (config.name, config.platform, config.max_batch_size) == (
        "seednet",
        "pytorch_libtorch",
        MAX_BATCH,
    )
    name = triton_config_pb.DataType.Name
    assert [(i.name, name(i.data_type), list(i.dims), i.optional) for i in config.input] == [
        ("images", "TYPE_UINT8", [3, 32, 32], True),
        ("image_bytes", "TYPE_STRING", [1], True),
    ]
    # image_bytes: "reshape: { shape: [] }" (present, empty); images: no reshape
    assert [i.HasField("reshape") for i in config.input] == [False, True]
    assert list(config.input[1].reshape.shape) == []
    assert [(o.name, name(o.data_type), list(o.dims)) for o in config.output] == [
        ("probabilities", "TYPE_FP32", [10]),
        ("attention", "TYPE_FP32", [7, 2]),
    ]
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    no_batching = model_config_response(model_config("seednet", "pytorch_libtorch", 4, None))
    assert not no_batching.config.HasField("dynamic_batching")


def test_typed_contents_count_mismatch():
    msg = pb.ModelInferRequest()
    t = msg.inputs.add(name="images", datatype="UINT8", shape=[1, 3, 32, 32])
    t.contents.uint_contents.extend([0] * 100)
    with pytest.raises(ProtocolError, match="contents have 100 elements"):
        parse(msg)


def test_batch_limit_and_shape(rng):
    with pytest.raises(ProtocolError, match="at most 8 per request"):
        parse(triton_request([grpc_input("images", images(rng, 9), "UINT8")]))
    arr = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ProtocolError, match="must be \\[N, 3, 32, 32\\]"):
        parse(triton_request([grpc_input("images", arr, "UINT8")]))


def test_both_and_neither_input(rng):
    both = [
        grpc_input("images", images(rng, 1), "UINT8"),
        grpc_input("image_bytes", np.array([b"x"], dtype=object), "BYTES"),
    ]
    with pytest.raises(ProtocolError, match="exactly one input"):
        parse(triton_request(both))
    with pytest.raises(ProtocolError, match="got none"):
        parse(pb.ModelInferRequest(model_name="seednet"))


def test_unknown_output_and_bad_classification(rng):
    inputs = [grpc_input("images", images(rng, 1), "UINT8")]
    with pytest.raises(ProtocolError, match="unknown output 'logits'"):
        parse(triton_request(inputs, [grpcclient.InferRequestedOutput("logits")]))
    msg = triton_request(inputs, [grpcclient.InferRequestedOutput("probabilities")])
    msg.outputs[0].parameters["classification"].string_param = "3"
    with pytest.raises(ProtocolError, match="classification must be a non-negative integer"):
        parse(msg)


# --- a real gRPC server with our generated service, and tritonclient talking to it ------


class _Servicer(pb_grpc.GRPCInferenceServiceServicer):
    """Scaffolding: the codec behind the generated service, with a stand-in model."""

    def ServerMetadata(self, request, context):
        return server_metadata_response(server_metadata("seednet", "0.1.0"))

    def ModelMetadata(self, request, context):
        meta = model_metadata(request.name, ["1"], "pytorch_libtorch")
        return model_metadata_response(meta)

    def ModelInfer(self, request, context):
        try:
            req = parse_grpc_request(request, max_batch_size=MAX_BATCH)
        except ProtocolError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        pixels = req.images.reshape(req.batch_size, -1).astype(np.float32)
        probs = np.repeat(pixels.mean(axis=1, keepdims=True), 10, axis=1) / 255
        probs[:, 3] += 1
        results = {"probabilities": probs, "attention": np.zeros((req.batch_size, 7, 2))}
        return build_grpc_response(req, results, model_name=request.model_name, model_version="1")


@pytest.fixture(scope="module")
def grpc_url():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_tritonclient_grpc_end_to_end(grpc_url, rng):
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        meta = client.get_server_metadata(as_json=True)
        assert meta["extensions"] == ["binary_tensor_data", "classification", "model_configuration"]
        model = client.get_model_metadata("seednet", as_json=True)
        assert [(i["name"], i["shape"]) for i in model["inputs"]] == [
            ("images", ["-1", "3", "32", "32"]),  # int64 as strings: protobuf's JSON mapping
            ("image_bytes", ["-1", "1"]),
        ]
        pixels = images(rng, 2)
        result = client.infer(
            "seednet",
            [grpc_input("images", pixels, "UINT8")],
            outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=1)],
            request_id="e2e",
        )
        assert result.get_response().id == "e2e"
        top = result.as_numpy("probabilities")
        assert top.shape == (2, 1) and all(bytes(t).endswith(b":3:cat") for t in top[:, 0])

        with pytest.raises(InferenceServerException, match="at most 8 per request") as err:
            client.infer("seednet", [grpc_input("images", images(rng, 9), "UINT8")])
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        client.close()
