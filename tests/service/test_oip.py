"""The Open Inference Protocol v2, end to end, with the real Triton clients.

A real uvicorn serves the tiny really-trained model (``server`` in tests/conftest.py)
with its gRPC server on; ``tritonclient.http`` and ``tritonclient.grpc`` talk to it
as they would to Triton. Answers are compared with ``/predict``'s for the same images.
"""

from __future__ import annotations

import asyncio
import io
import json
import re

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.conftest import LiveServer
from tests.service.test_service import CLASSES, metric_value

N_IMAGES = 4


def png(pixels: np.ndarray) -> bytes:
    """A lossless file of CHW uint8 pixels: /predict decodes it to exactly these pixels."""
    buf = io.BytesIO()
    Image.fromarray(pixels.transpose(1, 2, 0)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (N_IMAGES, 3, 32, 32), dtype=np.uint8)


@pytest.fixture(scope="module")
def files(pixels, cifar_dir) -> list[bytes]:
    """Two PNGs of ``pixels`` and two real CIFAR-10 JPEGs."""
    jpegs = [(cifar_dir / "test" / c / "0001.jpg").read_bytes() for c in ("ship", "frog")]
    return [png(pixels[0]), png(pixels[1]), *jpegs]


def predict(url: str, files: list[bytes]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """/predict's probabilities, attention and labels for ``files`` (one request)."""
    r = httpx.post(
        f"{url}/predict",
        files=[("files", (f"f{i}", f)) for i, f in enumerate(files)],
        timeout=60,
    )
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    probs = np.array([[p["probabilities"][c] for c in CLASSES] for p in preds])
    att = np.array([[a["weights"] for a in p["attention"]] for p in preds])
    return probs, att, [p["label"] for p in preds]


@pytest.fixture(scope="module")
def expected(server, files):
    return predict(server.url, files)


@pytest.fixture(scope="module")
def expected_pixels(server, pixels):
    return predict(server.url, [png(p) for p in pixels])


@pytest.fixture
def http(server):
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()
    # tritonclient's __del__ closes again, from whatever thread the garbage collector
    # happens to run in, and gevent refuses that: closed once is enough.
    client.close = lambda: None


@pytest.fixture
def grpc(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def bytes_tensor(files: list[bytes]) -> np.ndarray:
    return np.array(files, dtype=np.object_).reshape(len(files), 1)


def http_input(name, data, datatype, binary=True):
    i = httpclient.InferInput(name, list(data.shape), datatype)
    i.set_data_from_numpy(data, binary_data=binary)
    return i


def grpc_input(name, data, datatype):
    i = grpcclient.InferInput(name, list(data.shape), datatype)
    i.set_data_from_numpy(data)
    return i


def assert_same_answer(result, expected) -> None:
    probs, att, labels = expected
    got = result.as_numpy("probabilities")
    assert got.dtype == np.float32 and got.shape == probs.shape
    np.testing.assert_allclose(got, probs, rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("attention"), att, rtol=0, atol=1e-6)
    assert [CLASSES[i] for i in got.argmax(axis=1)] == labels


# --------------------------------------------------------------- health, metadata, config


def test_live_and_ready_agree_with_health_routes(server, http, grpc):
    assert http.is_server_live() and http.is_server_ready()
    assert http.is_model_ready("tiny") and http.is_model_ready("tiny", "1")
    assert grpc.is_server_live() and grpc.is_server_ready()
    assert grpc.is_model_ready("tiny") and grpc.is_model_ready("tiny", "1")
    for path in ("/health/ready", "/v2/health/ready", "/health/live", "/v2/health/live"):
        assert httpx.get(server.url + path).status_code == 200, path


def test_server_metadata(http, grpc):
    meta = http.get_server_metadata()
    assert meta["name"] == "seednet" and meta["version"]
    assert {"binary_tensor_data", "classification", "model_configuration"} <= set(
        meta["extensions"]
    )
    g = grpc.get_server_metadata(as_json=True)
    assert g["name"] == meta["name"] and g["version"] == meta["version"]
    assert g["extensions"] == meta["extensions"]


def test_model_metadata_lists_registry_versions_and_the_served_one(http, grpc):
    meta = http.get_model_metadata("tiny")
    assert meta["name"] == "tiny"
    assert meta["versions"] == ["1", "2"] and meta["served_version"] == "1"
    assert "one version at a time" in meta["note"]
    assert meta["platform"] == "pytorch_libtorch"
    # image_bytes is accepted too, but only the tensor input is advertised: perf_analyzer
    # fills every advertised input with random data and one request takes one input
    assert meta["inputs"] == [
        {"name": "images", "datatype": "UINT8", "shape": [-1, 3, 32, 32]},
    ]
    assert "image_bytes" in meta["note"]
    assert meta["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "attention", "datatype": "FP32", "shape": [-1, 7, 2]},
    ]
    assert http.get_model_metadata("tiny", "1")["versions"] == ["1", "2"]
    g = grpc.get_model_metadata("tiny", as_json=True)
    assert g["name"] == "tiny" and g["versions"] == ["1", "2"]
    assert g["platform"] == "pytorch_libtorch"
    # protobuf's JSON writes int64 as strings
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in g["inputs"]] == [
        (t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]
    ]


def test_model_config_is_what_perf_analyzer_reads(server, http):
    config = http.get_model_config("tiny")
    assert config["name"] == "tiny"
    assert config["max_batch_size"] == server.settings.max_images_per_request
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 5000}
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("images", "TYPE_UINT8", [3, 32, 32]),
    ]
    assert [(o["name"], o["dims"]) for o in config["output"]] == [
        ("probabilities", [10]),
        ("attention", [7, 2]),
    ]


def test_grpc_model_config_equals_the_rest_one(http, grpc):
    rest = http.get_model_config("tiny")
    config = grpc.get_model_config("tiny", as_json=True)["config"]

    def ints(xs: list) -> list[int]:  # protobuf's JSON writes int64 as strings
        return [int(x) for x in xs]

    assert config["max_batch_size"] == rest["max_batch_size"]
    assert [(i["name"], i["data_type"], ints(i["dims"])) for i in config["input"]] == [
        (i["name"], i["data_type"], i["dims"]) for i in rest["input"]
    ]
    assert [(o["name"], ints(o["dims"])) for o in config["output"]] == [
        (o["name"], o["dims"]) for o in rest["output"]
    ]
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) == 5000
    with pytest.raises(InferenceServerException, match="one version at a time"):
        grpc.get_model_config("tiny", "2")


# ------------------------------------------------------------------------------ inference


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_images_equal_predict(http, pixels, expected_pixels, binary):
    outputs = [
        httpclient.InferRequestedOutput("probabilities", binary_data=binary),
        httpclient.InferRequestedOutput("attention", binary_data=binary),
    ]
    result = http.infer(
        "tiny", [http_input("images", pixels, "UINT8", binary)], outputs=outputs, request_id="r-1"
    )
    assert_same_answer(result, expected_pixels)
    response = result.get_response()
    assert response["id"] == "r-1"
    assert (response["model_name"], response["model_version"]) == ("tiny", "1")
    for out in response["outputs"]:  # JSON tensors carry "data", binary ones a size
        assert ("data" in out) is not binary


def test_http_image_bytes_equal_predict(http, files, expected):
    result = http.infer("tiny", [http_input("image_bytes", bytes_tensor(files), "BYTES")])
    assert_same_answer(result, expected)
    # [N] is accepted as well as [N, 1]
    flat = np.array(files, dtype=np.object_)
    assert_same_answer(http.infer("tiny", [http_input("image_bytes", flat, "BYTES")]), expected)


def test_http_versioned_infer_and_json_request_with_binary_outputs(http, pixels, expected_pixels):
    result = http.infer(
        "tiny",
        [http_input("images", pixels, "UINT8", binary=False)],
        model_version="1",
    )
    assert_same_answer(result, expected_pixels)


def test_grpc_images_and_image_bytes_equal_predict(grpc, pixels, files, expected_pixels, expected):
    result = grpc.infer("tiny", [grpc_input("images", pixels, "UINT8")], request_id="g-1")
    assert_same_answer(result, expected_pixels)
    response = result.get_response(as_json=True)
    assert response["id"] == "g-1" and response["model_version"] == "1"
    result = grpc.infer("tiny", [grpc_input("image_bytes", bytes_tensor(files), "BYTES")])
    assert_same_answer(result, expected)
    assert_same_answer(
        grpc.infer("tiny", [grpc_input("images", pixels, "UINT8")], "1"), expected_pixels
    )


def _check_classification(top: np.ndarray, expected, k: int) -> None:
    probs, _, labels = expected
    assert top.shape == (len(probs), k)
    for row, p, label in zip(top, probs, labels, strict=True):
        # binary BYTES come back as bytes, JSON ones as str
        entries = [(e.decode() if isinstance(e, bytes) else e).split(":") for e in row]
        order = np.argsort(-p, kind="stable")[:k]
        assert [int(e[1]) for e in entries] == list(order)
        assert [e[2] for e in entries] == [CLASSES[i] for i in order]
        assert entries[0][2] == label
        assert [float(e[0]) for e in entries] == pytest.approx(p[order], abs=1e-6)


def test_classification_extension_http_and_grpc(http, grpc, files, expected):
    data = bytes_tensor(files)
    result = http.infer(
        "tiny",
        [http_input("image_bytes", data, "BYTES")],
        outputs=[httpclient.InferRequestedOutput("probabilities", class_count=3)],
    )
    _check_classification(result.as_numpy("probabilities"), expected, 3)
    assert result.as_numpy("attention") is None  # only what was asked for
    json_result = http.infer(
        "tiny",
        [http_input("image_bytes", data, "BYTES")],
        outputs=[
            httpclient.InferRequestedOutput("probabilities", binary_data=False, class_count=2)
        ],
    )
    _check_classification(json_result.as_numpy("probabilities"), expected, 2)
    g = grpc.infer(
        "tiny",
        [grpc_input("image_bytes", data, "BYTES")],
        outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=3)],
    )
    _check_classification(g.as_numpy("probabilities"), expected, 3)


# ----------------------------------------------------------------------- refused requests


def _http_refused(http, inputs, status: str, match: str, **kw) -> None:
    with pytest.raises(InferenceServerException, match=match) as info:
        http.infer("tiny", inputs, **kw)
    assert info.value.status() == status


def _raw_post(server, body: bytes, header_length: int | None = None, path="/v2/models/tiny/infer"):
    headers = {"Content-Type": "application/octet-stream"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    return httpx.post(server.url + path, content=body, headers=headers, timeout=60)


def _assert_v2_error(r: httpx.Response, status: int, match: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    assert re.search(match, body["error"]), body["error"]


def test_bad_tensors_over_http_are_400_and_the_next_request_is_served(
    server, http, pixels, expected_pixels
):
    limit = server.settings.max_images_per_request
    images_json = {"name": "images", "datatype": "UINT8", "shape": [1, 3, 32, 32]}
    cases = [
        # wrong datatype, wrong shape, too many images, both inputs, an unknown input
        lambda: _http_refused(
            http, [http_input("images", pixels.astype(np.float32), "FP32")], "400", "UINT8"
        ),
        lambda: _http_refused(
            http, [http_input("images", pixels[:, :, :, :31].copy(), "UINT8")], "400", "shape"
        ),
        lambda: _http_refused(
            http,
            [http_input("images", np.zeros((limit + 1, 3, 32, 32), np.uint8), "UINT8")],
            "400",
            f"at most {limit}",
        ),
        lambda: _http_refused(
            http,
            [
                http_input("images", pixels[:1], "UINT8"),
                http_input("image_bytes", bytes_tensor([b"x"]), "BYTES"),
            ],
            "400",
            "exactly one input",
        ),
        lambda: _http_refused(
            http, [http_input("pixels", pixels, "UINT8")], "400", "unknown input"
        ),
        # a byte count that does not match the shape
        lambda: _assert_v2_error(
            _raw_post(
                server,
                (
                    h := json.dumps(
                        {"inputs": [{**images_json, "parameters": {"binary_data_size": 3000}}]}
                    ).encode()
                )
                + bytes(3000),
                len(h),
            ),
            400,
            "needs 3072 bytes",
        ),
        # truncated binary data
        lambda: _assert_v2_error(
            _raw_post(
                server,
                (
                    h := json.dumps(
                        {"inputs": [{**images_json, "parameters": {"binary_data_size": 3072}}]}
                    ).encode()
                )
                + bytes(100),
                len(h),
            ),
            400,
            "truncated",
        ),
        # a JSON tensor with too few values, a value out of range, and not JSON at all
        lambda: _assert_v2_error(
            _raw_post(server, json.dumps({"inputs": [{**images_json, "data": [1, 2]}]}).encode()),
            400,
            "needs 3072",
        ),
        lambda: _assert_v2_error(
            _raw_post(
                server, json.dumps({"inputs": [{**images_json, "data": [256] * 3072}]}).encode()
            ),
            400,
            "out of range",
        ),
        lambda: _assert_v2_error(_raw_post(server, b"{not json"), 400, "not valid JSON"),
        lambda: _assert_v2_error(_raw_post(server, b"{}", header_length=50), 400, "only 2 bytes"),
    ]
    for case in cases:
        case()
        result = http.infer("tiny", [http_input("images", pixels, "UINT8")])
        assert_same_answer(result, expected_pixels)


def test_bad_image_files_get_predict_statuses(server, http, pixels, expected_pixels):
    cases = [
        (b"this is not an image", "415", "not a supported image"),
        (b"", "422", "empty"),
        (png(pixels[0])[:60], "422", "truncated or corrupt"),
        (bytes(server.settings.max_upload_bytes + 1), "413", "the limit is"),
    ]
    for data, status, match in cases:
        _http_refused(
            http, [http_input("image_bytes", bytes_tensor([data]), "BYTES")], status, match
        )
        # JSON BYTES (UTF-8 strings) go the same way; a file too large for the JSON part
        # of a request is refused by that limit first (also a 413)
        if data and data.isascii():
            _http_refused(
                http,
                [http_input("image_bytes", bytes_tensor([data]), "BYTES", binary=False)],
                status,
                match if status != "413" else "the limit is|the JSON part",
            )
        assert_same_answer(
            http.infer("tiny", [http_input("images", pixels, "UINT8")]), expected_pixels
        )
    # the error names the element
    _http_refused(
        http,
        [http_input("image_bytes", bytes_tensor([png(pixels[0]), b"nope"]), "BYTES")],
        "415",
        r"image_bytes\[1\]",
    )


def test_bad_tensors_over_grpc_are_invalid_argument(server, grpc, pixels, expected_pixels):
    limit = server.settings.max_images_per_request
    cases = [
        ([grpc_input("images", pixels.astype(np.float32), "FP32")], "UINT8"),
        ([grpc_input("images", pixels[:, :2].copy(), "UINT8")], "shape"),
        ([grpc_input("images", np.zeros((limit + 1, 3, 32, 32), np.uint8), "UINT8")], "at most"),
        (
            [grpc_input("image_bytes", bytes_tensor([b"not an image"]), "BYTES")],
            "not a supported image",
        ),
        (
            [
                grpc_input("images", pixels[:1], "UINT8"),
                grpc_input("image_bytes", bytes_tensor([b"x"]), "BYTES"),
            ],
            "exactly one input",
        ),
    ]
    for inputs, match in cases:
        with pytest.raises(InferenceServerException, match=match) as info:
            grpc.infer("tiny", inputs)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert_same_answer(
            grpc.infer("tiny", [grpc_input("images", pixels, "UINT8")]), expected_pixels
        )


def test_versions_that_are_not_served_and_unknown_models(server, http, grpc, pixels):
    inputs = [http_input("images", pixels, "UINT8")]
    # tiny@2 is in the registry but tiny@1 is the one loaded
    for call in (
        lambda: http.infer("tiny", inputs, model_version="2"),
        lambda: http.get_model_metadata("tiny", "2"),
        lambda: http.get_model_config("tiny", "2"),
    ):
        with pytest.raises(InferenceServerException, match="one version at a time, version 1"):
            call()
    assert not http.is_model_ready("tiny", "2")
    r = httpx.get(f"{server.url}/v2/models/tiny/versions/2/ready")
    _assert_v2_error(r, 400, "exists but is not loaded")
    _assert_v2_error(httpx.get(f"{server.url}/v2/models/tiny/versions/99"), 404, "no version")
    _assert_v2_error(httpx.get(f"{server.url}/v2/models/nope"), 404, "unknown model 'nope'")
    _assert_v2_error(_raw_post(server, b"{}", path="/v2/models/nope/infer"), 404, "unknown model")

    assert grpc.is_model_ready("tiny", "2") is False
    with pytest.raises(InferenceServerException, match="one version at a time") as info:
        grpc.infer("tiny", [grpc_input("images", pixels, "UINT8")], model_version="2")
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="unknown model") as info:
        grpc.get_model_metadata("nope")
    assert info.value.status() == "StatusCode.NOT_FOUND"


def test_v2_errors_have_the_protocol_shape_and_the_json_api_keeps_its_own(server):
    _assert_v2_error(httpx.get(f"{server.url}/v2/nothing/here"), 404, "no such route")
    _assert_v2_error(httpx.get(f"{server.url}/v2/models/tiny/infer"), 405, "not allowed")
    r = httpx.get(f"{server.url}/models/nope/anything")
    assert r.status_code == 404 and set(r.json()["error"]) == {"code", "message", "status"}
    r = httpx.post(f"{server.url}/predict", files={"file": ("x.txt", b"text")})
    assert r.status_code == 415 and r.json()["error"]["code"]


def test_gzip_request_bodies_are_accepted(http, pixels, expected_pixels):
    result = http.infer(
        "tiny", [http_input("images", pixels, "UINT8")], request_compression_algorithm="gzip"
    )
    assert_same_answer(result, expected_pixels)


# ------------------------------------------------------------------- batching and metrics


def test_predict_rest_v2_and_grpc_batch_together_and_are_counted_by_protocol(
    server, pixels, files, expected_pixels
):
    before = httpx.get(f"{server.url}/metrics").text
    n = 6  # requests per protocol, one image each
    n_refused = 2  # gRPC calls with a float tensor: refused before any batch, counted

    async def run():
        aio = grpcaio.InferenceServerClient(server.grpc_url)
        async with httpx.AsyncClient(timeout=120) as client:
            body, length = httpclient.InferenceServerClient.generate_request_body(
                [http_input("images", pixels[:1], "UINT8")]
            )

            async def v2():
                r = await client.post(
                    f"{server.url}/v2/models/tiny/infer",
                    content=body,
                    headers={"Inference-Header-Content-Length": str(length)},
                )
                return r.status_code == 200

            async def rest():
                r = await client.post(f"{server.url}/predict", files={"file": ("a.png", files[0])})
                return r.status_code == 200

            async def grpc_call():
                result = await aio.infer("tiny", [grpc_input("images", pixels[:1], "UINT8")])
                np.testing.assert_allclose(
                    result.as_numpy("probabilities"), expected_pixels[0][:1], atol=1e-6
                )
                return True

            async def grpc_refused():
                bad = grpc_input("images", pixels[:1].astype(np.float32), "FP32")
                try:
                    await aio.infer("tiny", [bad])
                except InferenceServerException as e:
                    return e.status() == "StatusCode.INVALID_ARGUMENT"
                return False

            try:
                calls = [f() for _ in range(n) for f in (v2, rest, grpc_call)]
                calls += [grpc_refused() for _ in range(n_refused)]
                return await asyncio.gather(*calls)
            finally:
                await aio.close()

    assert all(asyncio.run(run()))
    after = httpx.get(f"{server.url}/metrics").text

    def delta(name):
        return metric_value(after, name) - metric_value(before, name)

    assert delta("seednet_batch_size_sum") == 3 * n
    assert delta("seednet_batch_size_count") < 3 * n, "no batch merged two requests"

    def count(labels: str) -> float:
        pattern = re.compile(r"seednet_requests_total\{" + labels + r"\} (\S+)")
        return sum(float(v) for v in pattern.findall(after)) - sum(
            float(v) for v in pattern.findall(before)
        )

    assert (
        count('method="POST",protocol="rest_v2",route="/v2/models/\\{name\\}/infer",status="200"')
        == n
    )
    assert count('method="POST",protocol="rest",route="/predict",status="200"') == n
    assert (
        count(
            'method="RPC",protocol="grpc",'
            'route="inference.GRPCInferenceService/ModelInfer",status="OK"'
        )
        == n
    )
    infer = 'route="inference.GRPCInferenceService/ModelInfer"'
    assert count(f'method="RPC",protocol="grpc",{infer},status="INVALID_ARGUMENT"') == n_refused
    errors = re.compile(r"seednet_request_errors_total\{(.*)\} (\S+)")

    def grpc_errors(text: str) -> dict[str, float]:
        return {k: float(v) for k, v in errors.findall(text) if 'protocol="grpc"' in k}

    new = {k: v - grpc_errors(before).get(k, 0.0) for k, v in grpc_errors(after).items()}
    assert {k: v for k, v in new.items() if v} == {
        f'protocol="grpc",{infer},status="INVALID_ARGUMENT"': n_refused
    }


# ---------------------------------------------------------------------- limits, lifecycle


@pytest.mark.slow
def test_body_and_message_limits_follow_the_byte_limits(served_registry):
    from service.frontends.oip.common import request_limits
    from service.frontends.oip.grpc import max_receive_bytes

    with LiveServer(
        registry_root=served_registry,
        model_name="tiny",
        device="cpu",
        backend="torchscript",
        max_images_per_request=2,
        max_upload_bytes=20_000,
        grpc_port=0,
    ) as srv:
        limit = request_limits(srv.settings).total_bytes
        assert limit < 200_000
        big = np.array([bytes(max_receive_bytes(srv.app.state.service))], dtype=np.object_)
        big = big.reshape(1, 1)
        r = _raw_post(srv, b"x" * (limit + 1))
        _assert_v2_error(r, 413, f"{limit}")  # "at most N accepted" / "over the limit of N"
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        with pytest.raises(InferenceServerException) as info:
            client.infer("tiny", [grpc_input("image_bytes", big, "BYTES")])
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        # within the message limit, over the per-file limit: the file's own error
        with pytest.raises(InferenceServerException, match="the limit is"):
            client.infer(
                "tiny", [grpc_input("image_bytes", bytes_tensor([bytes(20_001)]), "BYTES")]
            )
        assert client.is_server_ready()
        client.close()
        port = srv.app.state.service.grpc_port
    # the gRPC server stopped with the app
    assert srv.app.state.service.grpc_port is None
    closed = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    with pytest.raises(InferenceServerException):
        closed.is_server_live(client_timeout=2)
    closed.close()


# ------------------------------------------------------------------------- perf_analyzer


def _oip_bench():
    """bench/oip_bench.py as a module (bench/ is a folder of scripts, not a package)."""
    import importlib.util
    import sys

    from tests.conftest import REPO

    if "oip_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("oip_bench", REPO / "bench" / "oip_bench.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["oip_bench"] = module  # dataclasses look their module up while defining
        spec.loader.exec_module(module)
    return sys.modules["oip_bench"]


@pytest.fixture(scope="module")
def perf_analyzer():
    bench = _oip_bench()
    try:
        return bench.perf_analyzer_command()
    except bench.PerfAnalyzerUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("protocol", "data"), [("http", "random"), ("http", "files"), ("grpc", "files")]
)
def test_perf_analyzer_runs_without_errors(server, files, perf_analyzer, protocol, data, tmp_path):
    """`random` is perf_analyzer's default (no --input-data): what a user types first."""
    import subprocess

    binary, env = perf_analyzer
    url = server.url.removeprefix("http://") if protocol == "http" else server.grpc_url
    argv = [binary, "-m", "tiny", "-u", url, "-i", protocol]
    if data == "files":
        path = tmp_path / "images.json"
        path.write_text(json.dumps(_oip_bench().input_data(files, "images")))
        argv += ["--input-data", str(path)]
    # -s 1000: this checks that every request succeeds, not that a busy machine is steady
    r = subprocess.run(
        [*argv, "-p", "2000", "-s", "1000", "-r", "10"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert re.search(r"Throughput: [0-9.]+ infer/sec", out), out
    assert "error" not in out.lower(), out


@pytest.mark.slow
def test_oip_bench_prints_a_table_for_both_protocols(server, perf_analyzer, cifar_dir):
    import subprocess
    import sys

    from tests.conftest import REPO

    r = subprocess.run(
        [
            sys.executable,
            "bench/oip_bench.py",
            "--http",
            server.url.removeprefix("http://"),
            "--grpc",
            server.grpc_url,
            "--model",
            "tiny",
            "--inputs",
            "images",
            "--concurrency",
            "2",
            "--batch",
            "2",
            "--count",
            "8",
            "--images",
            str(cifar_dir / "test"),
            "--measurement-ms",
            "1000",
            "--stability",
            "1000",
        ],
        cwd=REPO,
        env=perf_analyzer[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    table = r.stdout.split("\n\n")[-1].splitlines()
    rows = [line.split() for line in table if line.startswith(("http ", "grpc "))]
    assert [row[:4] for row in rows] == [
        ["http", "images", "2", "2"],
        ["grpc", "images", "2", "2"],
    ]
    assert all(float(row[4]) > 0 for row in rows)
