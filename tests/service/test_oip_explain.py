"""The inference protocol's ``explain`` extension with the real Triton clients.

Explain outputs (``gradcam``, ``branch_strength``, ...) are asked for by name over REST
``/v2`` (``tritonclient.http``) and gRPC (``tritonclient.grpc``), with the request
parameters ``target`` and ``blocks``; the maps must equal what ``POST /explain`` sends
for the same pixels (float16 there, so within its precision) and what the Explainer
computes in this process.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from registry import Registry
from seednet.heatmaps import from_float16_base64
from tests.conftest import LiveServer
from tests.service.test_oip import bytes_tensor, grpc_input, http_input, png

EXPLAIN_OUTPUTS = (
    "explained_class",
    "gradcam",
    "macro_gradcam",
    "branch_gradcam",
    "branch_gradcam_share",
    "branch_strength",
    "branch_strength_share",
)


@pytest.fixture(scope="module")
def pixels(golden_1) -> np.ndarray:
    return golden_1["images"][:3]


@pytest.fixture(scope="module")
def want(served_registry, pixels) -> dict[str, np.ndarray]:
    """The Explainer's maps for blocks 6 and 7, for class 3 (cat)."""
    from seednet.explain import Explainer

    reg = Registry(served_registry)
    explainer = Explainer.from_registry(reg, reg.resolve("tiny", "1"))
    return explainer.explain(pixels, target=3, blocks=[6, 7])


@pytest.fixture
def http(server):
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()
    client.close = lambda: None  # (see tests/service/test_oip.py)


@pytest.fixture
def grpc(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def check_maps(result, want: dict[str, np.ndarray], names=EXPLAIN_OUTPUTS) -> None:
    for name in names:
        got = result.as_numpy(name)
        expected = want["target"] if name == "explained_class" else want[name]
        assert got is not None, name
        assert got.shape == expected.shape, (name, got.shape, expected.shape)
        if name == "explained_class":
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, expected)
        else:
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=name)


def test_metadata_advertises_the_extension(server, http, grpc):
    assert "explain" in http.get_server_metadata()["extensions"]
    assert "explain" in grpc.get_server_metadata(as_json=True)["extensions"]
    meta = http.get_model_metadata("tiny")
    # the model's own outputs stay what a plain request returns
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "attention"]
    outputs = {o["name"]: o for o in meta["explain"]["outputs"]}
    assert set(outputs) == set(EXPLAIN_OUTPUTS)
    assert outputs["gradcam"] == {"name": "gradcam", "datatype": "FP32", "shape": [-1, -1, 32, 32]}
    assert outputs["branch_strength"]["shape"] == [-1, -1, 2, 32, 32]
    assert outputs["explained_class"] == {
        "name": "explained_class",
        "datatype": "INT64",
        "shape": [-1],
    }
    assert set(meta["explain"]["parameters"]) == {"target", "blocks"}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_explain_outputs_equal_the_explainer(http, pixels, want, binary):
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in EXPLAIN_OUTPUTS]
    outputs.append(httpclient.InferRequestedOutput("probabilities", binary_data=binary))
    result = http.infer(
        "tiny",
        [http_input("images", pixels, "UINT8", binary)],
        outputs=outputs,
        parameters={"target": 3, "blocks": "6,7"},
    )
    check_maps(result, want)
    np.testing.assert_allclose(result.as_numpy("probabilities").sum(1), 1, atol=1e-5)
    assert result.as_numpy("attention") is None  # only what was named


def test_grpc_explain_outputs_equal_the_explainer(grpc, pixels, want):
    result = grpc.infer(
        "tiny",
        [grpc_input("images", pixels, "UINT8")],
        outputs=[grpcclient.InferRequestedOutput(n) for n in EXPLAIN_OUTPUTS],
        parameters={"target": "cat", "blocks": "7,6"},  # a label; blocks in any order
    )
    check_maps(result, want)
    assert result.as_numpy("probabilities") is None


def test_defaults_equal_post_explain_for_image_files(server, http, grpc, pixels):
    """No parameters: every block, each image's predicted class; image_bytes decoded as
    /predict decodes uploads. The maps equal /explain's (float16 there)."""
    files = [png(p) for p in pixels]
    r = httpx.post(
        f"{server.url}/explain",
        files=[("files", (f"{i}.png", f)) for i, f in enumerate(files)],
        params={"encoding": "f16"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    explained = r.json()["explanations"]
    names = ("explained_class", "gradcam", "branch_strength", "macro_gradcam")
    results = [
        http.infer(
            "tiny",
            [http_input("image_bytes", bytes_tensor(files), "BYTES")],
            outputs=[httpclient.InferRequestedOutput(n) for n in (*names, "probabilities")],
        ),
        grpc.infer(
            "tiny",
            [grpc_input("image_bytes", bytes_tensor(files), "BYTES")],
            outputs=[grpcclient.InferRequestedOutput(n) for n in (*names, "probabilities")],
        ),
    ]
    for result in results:
        classes = result.as_numpy("explained_class")
        np.testing.assert_array_equal(classes, result.as_numpy("probabilities").argmax(1))
        assert result.as_numpy("gradcam").shape == (3, 7, 32, 32)
        assert result.as_numpy("macro_gradcam").shape == (3, 2, 32, 32)
        for i, e in enumerate(explained):
            assert classes[i] == e["target"]
            for b, block in enumerate(e["blocks"]):
                f16 = from_float16_base64(block["gradcam"]["f16"])
                np.testing.assert_allclose(result.as_numpy("gradcam")[i, b], f16, atol=1e-3)
                for k, branch in enumerate(block["branches"]):
                    f16 = from_float16_base64(branch["strength"]["f16"])
                    got = result.as_numpy("branch_strength")[i, b, k]
                    np.testing.assert_allclose(got, f16, atol=1e-3)


def test_bad_explain_parameters_are_refused_over_both_protocols(http, grpc, pixels):
    cases = [
        ({"target": 10}, "class 10 is out of range"),
        ({"target": "unicorn"}, "unknown class 'unicorn'"),
        ({"blocks": "9"}, "block 9 is out of range"),
        ({"blocks": "a,b"}, "block numbers"),
    ]
    for parameters, match in cases:
        with pytest.raises(InferenceServerException, match=match) as info:
            http.infer(
                "tiny",
                [http_input("images", pixels, "UINT8")],
                outputs=[httpclient.InferRequestedOutput("gradcam")],
                parameters=parameters,
            )
        assert info.value.status() == "400"
        with pytest.raises(InferenceServerException, match=match) as info:
            grpc.infer(
                "tiny",
                [grpc_input("images", pixels, "UINT8")],
                outputs=[grpcclient.InferRequestedOutput("gradcam")],
                parameters=parameters,
            )
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="unknown output 'heatmap'"):
        http.infer(
            "tiny",
            [http_input("images", pixels, "UINT8")],
            outputs=[httpclient.InferRequestedOutput("heatmap")],
        )
    # a plain request is answered as before, without explanations
    result = http.infer("tiny", [http_input("images", pixels, "UINT8")])
    assert result.as_numpy("gradcam") is None and result.as_numpy("probabilities") is not None


def test_with_explanations_off_the_extension_is_not_advertised(served_registry, golden_1):
    with LiveServer(
        registry_root=served_registry,
        model_name="tiny",
        device="cpu",
        backend="torchscript",  # (auto would record its choice in the shared registry)
        explain="off",
    ) as srv:
        meta = httpx.get(f"{srv.url}/v2").json()
        model = httpx.get(f"{srv.url}/v2/models/tiny").json()
        client = httpclient.InferenceServerClient(srv.url.removeprefix("http://"))
        try:
            with pytest.raises(InferenceServerException, match="SEEDNET_EXPLAIN=off") as info:
                client.infer(
                    "tiny",
                    [http_input("images", golden_1["images"][:1], "UINT8")],
                    outputs=[httpclient.InferRequestedOutput("gradcam")],
                )
        finally:
            client.close()
            client.close = lambda: None
    assert "explain" not in meta["extensions"] and "explain" not in model
    assert info.value.status() == "400"
