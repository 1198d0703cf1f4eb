"""The conformance matrix: every protocol against every backend a user can reach.

A user's defaults are a configuration too: ``SEEDNET_BACKEND=auto`` picks whichever
full-precision backend is fastest on the machine it starts on (OpenVINO on one CPU, ONNX
Runtime on another), so the protocol, admission and hostile-input checks run against
``auto`` and against every fp32 backend installed here, each served by a real uvicorn
with its gRPC server, driven by ``/predict`` over HTTP and by the real Triton clients.
The same model (tiny@1) answers, so every backend's numbers must agree with the
TorchScript ones within the exports' proven tolerance.
"""

from __future__ import annotations

import io
import shutil
import threading
import typing

import grpc as grpclib
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from seednet.runtimes import openvino_available
from service.config import Settings
from service.dataplane.backends import FP32_BACKENDS, PLATFORMS
from service.lifecycle.autoselect import AUTO_MODES, auto_candidates
from tests.conftest import REPO, LiveServer, wait_until
from tests.service.test_service import CLASSES, metric_value

BACKENDS = [b for b in FP32_BACKENDS if b != "openvino" or openvino_available()] + ["auto"]
QUEUE_LIMIT = 6  # images that may wait; a request of more is refused at once


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.transpose(1, 2, 0)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module", params=BACKENDS)
def srv(request, served_registry, tmp_path_factory):
    root = served_registry
    if request.param.startswith("auto"):  # auto records its choice in the registry it serves
        root = tmp_path_factory.mktemp("auto-registry") / "registry"
        shutil.copytree(served_registry, root)
    with LiveServer(
        registry_root=root,
        model_name="tiny",
        device="cpu",
        backend=request.param,
        grpc_port=0,
        max_queue_images=QUEUE_LIMIT,
        queue_timeout_ms=1000,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(11).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)


@pytest.fixture(scope="module")
def reference(served_registry, pixels):
    """TorchScript's answers for ``pixels`` (outside any server)."""
    from registry import Registry
    from service.lifecycle.loading import load_backend

    reg = Registry(served_registry)
    return load_backend(reg, reg.resolve("tiny", "1"), "torchscript", "cpu").run(pixels)


@pytest.fixture
def http(srv):
    client = httpclient.InferenceServerClient(srv.url.removeprefix("http://"))
    yield client
    client.close()
    client.close = lambda: None  # (tritonclient's __del__ would close it again)


@pytest.fixture
def grpc(srv):
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    yield client
    client.close()


def http_input(name, data, datatype, binary=True):
    i = httpclient.InferInput(name, list(data.shape), datatype)
    i.set_data_from_numpy(data, binary_data=binary)
    return i


def grpc_input(name, data, datatype):
    i = grpcclient.InferInput(name, list(data.shape), datatype)
    i.set_data_from_numpy(data)
    return i


def files_tensor(files: list[bytes]) -> np.ndarray:
    return np.array(files, dtype=np.object_).reshape(len(files), 1)


def metric_sum(text: str, prefix: str) -> float:
    """The sum of every sample whose line starts with ``prefix`` (name and first labels)."""
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


def served_backend(srv: LiveServer) -> str:
    return httpx.get(f"{srv.url}/health/ready").json()["model"]["backend"]


def test_every_backend_value_is_a_complete_citizen():
    """Each value SEEDNET_BACKEND accepts has a platform for the protocol's metadata and
    a row in the README; auto's candidates are among them. A new backend without them
    fails here."""
    values = typing.get_args(Settings.model_fields["backend"].annotation)
    readme = (REPO / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `SEEDNET_BACKEND`"))
    for value in values:
        assert f"`{value}`" in row, f"README's SEEDNET_BACKEND row does not name {value}"
        if not value.startswith("auto"):
            assert value in PLATFORMS, f"backend {value} has no inference-protocol platform"
    assert set(auto_candidates("cpu")) <= set(values)
    assert set(FP32_BACKENDS) | {"onnx-int8"} == set(values) - set(AUTO_MODES)


def test_metadata_and_config_through_both_clients(srv, http, grpc):
    backend = served_backend(srv)
    assert backend in FP32_BACKENDS
    meta = http.get_model_metadata("tiny")
    assert meta["platform"] == PLATFORMS[backend]
    assert [i["name"] for i in meta["inputs"]] == ["images"]
    assert http.get_model_config("tiny")["max_batch_size"] == srv.settings.max_images_per_request
    gmeta = grpc.get_model_metadata("tiny", as_json=True)
    assert gmeta["platform"] == PLATFORMS[backend]
    assert grpc.get_model_config("tiny", as_json=True)["config"]["name"] == "tiny"
    assert http.is_server_ready() and grpc.is_model_ready("tiny")


def test_every_protocol_answers_the_same_numbers(srv, http, grpc, pixels, reference):
    files = [png(p) for p in pixels]
    r = httpx.post(
        f"{srv.url}/predict",
        files=[("files", (f"{i}.png", f)) for i, f in enumerate(files)],
        timeout=60,
    )
    assert r.status_code == 200, r.text
    via_predict = np.array(
        [[p["probabilities"][c] for c in CLASSES] for p in r.json()["predictions"]]
    )
    answers = {
        "predict": via_predict,
        "v2 images binary": http.infer("tiny", [http_input("images", pixels, "UINT8")]),
        "v2 images json": http.infer("tiny", [http_input("images", pixels, "UINT8", False)]),
        "v2 files": http.infer("tiny", [http_input("image_bytes", files_tensor(files), "BYTES")]),
        "grpc images": grpc.infer("tiny", [grpc_input("images", pixels, "UINT8")]),
        "grpc files": grpc.infer("tiny", [grpc_input("image_bytes", files_tensor(files), "BYTES")]),
    }
    for how, answer in answers.items():
        probs = answer if isinstance(answer, np.ndarray) else answer.as_numpy("probabilities")
        # fp32 exports are proven within 1e-4 of eager; PNG decodes to the same pixels
        np.testing.assert_allclose(probs, reference["probabilities"], atol=1e-4, err_msg=how)
        if not isinstance(answer, np.ndarray):
            np.testing.assert_allclose(
                answer.as_numpy("attention"), reference["attention"], atol=1e-4, err_msg=how
            )


def test_overload_is_429_with_retry_after_on_every_protocol(srv, http, grpc):
    too_many = np.zeros((QUEUE_LIMIT + 1, 3, 32, 32), dtype=np.uint8)
    r = httpx.post(
        f"{srv.url}/predict",
        files=[("files", (f"{i}.png", png(p))) for i, p in enumerate(too_many)],
        timeout=60,
    )
    assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded"
    assert int(r.headers["retry-after"]) >= 1
    body, length = httpclient.InferenceServerClient.generate_request_body(
        [http_input("images", too_many, "UINT8")]
    )
    headers = {"Inference-Header-Content-Length": str(length)} if length else {}
    r = httpx.post(f"{srv.url}/v2/models/tiny/infer", content=body, headers=headers)
    assert r.status_code == 429 and "capacity" in r.json()["error"]
    assert int(r.headers["retry-after"]) >= 1
    with pytest.raises(InferenceServerException) as info:
        grpc.infer("tiny", [grpc_input("images", too_many, "UINT8")])
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    # and each front end keeps serving
    assert http.infer("tiny", [http_input("images", too_many[:1], "UINT8")]).as_numpy(
        "probabilities"
    ).shape == (1, 10)


def test_a_request_past_its_deadline_is_503_on_every_protocol(srv, pixels):
    """The model thread is held, so nothing starts before the 1 s deadline: /predict and
    /v2 answer 503 with Retry-After, gRPC UNAVAILABLE with retry-after metadata; nothing
    refused is computed."""
    before = metric_value(httpx.get(f"{srv.url}/metrics").text, "seednet_images_processed_total")
    gate = threading.Event()
    srv.app.state.service.plane.batcher.executor.submit(gate.wait, 60)
    try:
        r = httpx.post(f"{srv.url}/predict", files={"file": ("a.png", png(pixels[0]))}, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "deadline_exceeded"
        assert int(r.headers["retry-after"]) >= 1
        body, length = httpclient.InferenceServerClient.generate_request_body(
            [http_input("images", pixels[:1], "UINT8")]
        )
        headers = {"Inference-Header-Content-Length": str(length)} if length else {}
        r = httpx.post(f"{srv.url}/v2/models/tiny/infer", content=body, headers=headers)
        assert r.status_code == 503 and "not computed" in r.json()["error"]
        assert int(r.headers["retry-after"]) >= 1
        channel = grpclib.insecure_channel(srv.grpc_url)
        from service.frontends.oip.codec import grpc_predict_v2_pb2 as pb

        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        request = pb.ModelInferRequest(model_name="tiny")
        request.inputs.add(name="images", datatype="UINT8", shape=[1, 3, 32, 32])
        request.raw_input_contents.append(pixels[:1].tobytes())
        with pytest.raises(grpclib.RpcError) as info:
            infer(request, timeout=30)
        assert info.value.code() == grpclib.StatusCode.UNAVAILABLE
        trailing = dict(info.value.trailing_metadata() or ())
        assert int(trailing["retry-after"]) >= 1
        channel.close()
    finally:
        gate.set()
    wait_until(
        lambda: metric_value(httpx.get(f"{srv.url}/metrics").text, "seednet_running_images") == 0,
        30,
        what="the held batch to end",
    )
    after = metric_value(httpx.get(f"{srv.url}/metrics").text, "seednet_images_processed_total")
    assert after == before


def test_hostile_requests_get_4xx_and_are_counted_on_every_protocol(srv, http, pixels):
    text = httpx.get(f"{srv.url}/metrics").text
    refused_before = metric_sum(text, 'seednet_request_errors_total{protocol="grpc"')
    # a JSON body of nothing but empty arrays: refused before it is parsed
    bomb = b'{"inputs": [' + b"[]," * 200_000 + b"[]]}"
    r = httpx.post(f"{srv.url}/v2/models/tiny/infer", content=bomb)
    assert r.status_code in (400, 413), r.text
    # a shape list of a million dimensions: refused, and not echoed back
    huge = b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [' + b"1," * 100_000
    huge += b'1], "data": [1]}]}'
    r = httpx.post(f"{srv.url}/v2/models/tiny/infer", content=huge)
    assert r.status_code in (400, 413) and len(r.content) < 2000, r.text[:200]
    # not an image, over every protocol: the same 415 / INVALID_ARGUMENT
    r = httpx.post(f"{srv.url}/predict", files={"file": ("a.txt", b"plain text")}, timeout=60)
    assert r.status_code == 415
    with pytest.raises(InferenceServerException, match="not a supported image"):
        http.infer("tiny", [http_input("image_bytes", files_tensor([b"plain text"]), "BYTES")])
    # bytes that are no protobuf message at all
    channel = grpclib.insecure_channel(srv.grpc_url)
    raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpclib.RpcError) as info:
        raw(b"\xff\xff\xff\xff not protobuf", timeout=30)
    assert info.value.code() == grpclib.StatusCode.INVALID_ARGUMENT
    assert len(info.value.details()) <= 1000
    channel.close()
    text = httpx.get(f"{srv.url}/metrics").text
    assert metric_sum(text, 'seednet_request_errors_total{protocol="grpc"') > refused_before
    assert 'status="500"' not in text and "INTERNAL" not in text
    # still serving
    np.testing.assert_equal(
        http.infer("tiny", [http_input("images", pixels[:1], "UINT8")])
        .as_numpy("probabilities")
        .shape,
        (1, 10),
    )
