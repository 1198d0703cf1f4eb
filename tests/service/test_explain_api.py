"""POST /explain, end to end: a real uvicorn, the tiny really-trained models, real files.

The maps the service sends are compared with what ``seednet.explain.Explainer`` computes
in this process from the same registry version and pixels (PNG files of known pixels
decode to exactly those pixels), so the whole path is checked: upload -> decode pool ->
explanation queue -> worker process -> wire encoding.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from registry import Registry
from seednet.heatmaps import from_float16_base64
from tests import image_factory as make
from tests.conftest import ADMIN_TOKEN, LiveServer, wait_until
from tests.service.test_service import CLASSES, metric_value

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
#: float16 keeps about 3 significant digits; maps are in [0, 1].
F16_TOLERANCE = 1e-3


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.transpose(1, 2, 0)).save(buf, "PNG")
    return buf.getvalue()


def explain(url: str, files: list[bytes] | bytes, timeout: float = 120, **params) -> httpx.Response:
    if isinstance(files, bytes):
        parts = {"file": ("image.png", files)}
    else:
        parts = [("files", (f"{i}.png", f)) for i, f in enumerate(files)]
    return httpx.post(f"{url}/explain", files=parts, params=params, timeout=timeout)


def f16(entry: dict) -> np.ndarray:
    return from_float16_base64(entry["f16"])


def png_map(entry: dict) -> np.ndarray:
    """A PNG map's alpha channel: the value (overlay maps carry it as alpha)."""
    assert entry["png"].startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(entry["png"].split(",", 1)[1])))
    assert img.size == (32, 32) and img.mode == "RGBA"
    return np.asarray(img)[..., 3] / 255.0


@pytest.fixture(scope="module")
def pixels(golden_1) -> np.ndarray:
    """Three real test images (the golden set's), as uint8 CHW."""
    return golden_1["images"][:3]


@pytest.fixture(scope="module")
def local_explainer(served_registry):
    from seednet.explain import Explainer

    reg = Registry(served_registry)

    def build(version: str) -> Explainer:
        return Explainer.from_registry(reg, reg.resolve("tiny", version))

    return build


@pytest.fixture(scope="module")
def explainer_1(local_explainer):
    return local_explainer("1")


# ------------------------------------------------------------------------ happy path


def test_explain_one_image_equals_the_explainer_and_defaults_to_the_predicted_class(
    server, pixels, explainer_1
):
    r = explain(server.url, png(pixels[0]), encoding="png,f16", include_input="true")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": "tiny", "version": "1", "backend": "eager", "device": "cpu"}
    (e,) = body["explanations"]
    want = explainer_1.explain(pixels[:1])

    # the prediction, and the class explained: the predicted one
    probs = np.array([e["prediction"]["probabilities"][c] for c in CLASSES])
    np.testing.assert_allclose(probs, want["probabilities"][0], atol=1e-5)
    assert e["prediction"]["label"] == CLASSES[int(probs.argmax())]
    assert e["target"] == int(probs.argmax()) and e["label"] == e["prediction"]["label"]
    assert e["probability"] == pytest.approx(probs[e["target"]])
    # the same class /predict gives (TorchScript there, eager here: equal within 1e-4)
    predicted = httpx.post(f"{server.url}/predict", files={"file": ("a.png", png(pixels[0]))})
    p = predicted.json()["predictions"][0]
    assert p["label"] == e["prediction"]["label"]
    assert (
        max(abs(p["probabilities"][c] - e["prediction"]["probabilities"][c]) for c in CLASSES)
        < 1e-4
    )

    # every block and macro block, in order, with the explainer's maps
    assert e["map_shape"] == [32, 32] and e["encodings"] == ["png", "f16"]
    assert [b["block"] for b in e["blocks"]] == list(range(1, 8))
    assert [m["blocks"] for m in e["macro_blocks"]] == [[3, 4], [6, 7]]
    for i, block in enumerate(e["blocks"]):
        np.testing.assert_allclose(f16(block["gradcam"]), want["gradcam"][0, i], atol=F16_TOLERANCE)
        np.testing.assert_allclose(png_map(block["gradcam"]), want["gradcam"][0, i], atol=1 / 255)
        np.testing.assert_allclose(block["attention"], want["attention"][0, i], atol=1e-6)
        assert [b["branch"] for b in block["branches"]] == [1, 2]
        for k, branch in enumerate(block["branches"]):
            np.testing.assert_allclose(
                f16(branch["gradcam"]), want["branch_gradcam"][0, i, k], atol=F16_TOLERANCE
            )
            np.testing.assert_allclose(
                f16(branch["strength"]), want["branch_strength"][0, i, k], atol=F16_TOLERANCE
            )
            assert branch["gradcam_share"] == pytest.approx(want["branch_gradcam_share"][0, i, k])
            assert branch["strength_share"] == pytest.approx(want["branch_strength_share"][0, i, k])
        assert sum(b["gradcam_share"] for b in block["branches"]) == pytest.approx(1, abs=1e-5)
    for m, macro in enumerate(e["macro_blocks"]):
        np.testing.assert_allclose(
            f16(macro["gradcam"]), want["macro_gradcam"][0, m], atol=F16_TOLERANCE
        )
    # include_input: the 32x32 picture the model saw
    img = Image.open(io.BytesIO(base64.b64decode(e["model_input"].split(",", 1)[1])))
    np.testing.assert_array_equal(np.asarray(img).transpose(2, 0, 1), pixels[0])
    assert e["original_size"] == [32, 32] and e["filename"] == "image.png"


def test_another_class_changes_the_class_maps_but_not_the_strength_maps(server, pixels):
    base = explain(server.url, png(pixels[0]), encoding="f16").json()["explanations"][0]
    other = next(c for c in range(10) if c != base["target"])
    by_label = explain(server.url, png(pixels[0]), encoding="f16", **{"class": CLASSES[other]})
    by_index = explain(server.url, png(pixels[0]), encoding="f16", **{"class": str(other)})
    assert by_label.status_code == 200, by_label.text
    e = by_label.json()["explanations"][0]
    assert (e["target"], e["label"]) == (other, CLASSES[other])
    assert e["prediction"] == base["prediction"]  # the prediction does not change
    assert e["probability"] == pytest.approx(e["prediction"]["probabilities"][CLASSES[other]])
    assert by_index.json()["explanations"][0]["blocks"] == e["blocks"]

    changed = [
        not np.allclose(f16(a["gradcam"]), f16(b["gradcam"]))
        for a, b in zip(base["blocks"], e["blocks"], strict=True)
    ]
    assert any(changed), "no block's Grad-CAM changed with the class"
    for a, b in zip(base["blocks"], e["blocks"], strict=True):
        for x, y in zip(a["branches"], b["branches"], strict=True):
            np.testing.assert_array_equal(f16(x["strength"]), f16(y["strength"]))


def test_blocks_macro_encodings_and_branch_maps_are_what_was_asked(server, pixels, explainer_1):
    r = explain(
        server.url,
        [png(p) for p in pixels],
        blocks="7,6",
        macro="false",
        encoding="f16",
        branch_maps="gradcam",
    )
    assert r.status_code == 200, r.text
    want = explainer_1.explain(pixels, blocks=[6, 7], macro=False)
    items = r.json()["explanations"]
    assert [e["filename"] for e in items] == ["0.png", "1.png", "2.png"]  # order kept
    for n, e in enumerate(items):
        assert e["target"] == int(want["target"][n])
        assert [b["block"] for b in e["blocks"]] == [6, 7] and e["macro_blocks"] == []
        assert e["encodings"] == ["f16"]
        for i, block in enumerate(e["blocks"]):
            assert set(block["gradcam"]) == {"f16"}
            np.testing.assert_allclose(
                f16(block["gradcam"]), want["gradcam"][n, i], atol=F16_TOLERANCE
            )
            for branch in block["branches"]:
                assert "gradcam" in branch and "strength" not in branch
    only_7 = explain(server.url, png(pixels[0]), blocks="7", branch_maps="none").json()
    (block,) = only_7["explanations"][0]["blocks"]
    assert block["block"] == 7 and set(block["gradcam"]) == {"png"}
    assert all(
        set(b) == {"branch", "attention", "gradcam_share", "strength_share"}
        for b in block["branches"]
    )
    assert (
        explain(server.url, png(pixels[0]), blocks="all").json()["explanations"][0]["blocks"][0][
            "block"
        ]
        == 1
    )


# ------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "maker, status, code",
    [
        (make.truncated_jpeg, 422, "corrupt_image"),
        (lambda: make.png_bomb_header(100000, 100000), 413, "too_many_pixels"),
        (make.empty, 422, "empty_file"),
        (make.text_file, 415, "unsupported_media_type"),
    ],
    ids=["truncated", "bomb", "empty", "text"],
)
def test_bad_files_get_the_predict_status(server, maker, status, code):
    data = maker()
    for route in ("predict", "explain"):
        r = httpx.post(f"{server.url}/{route}", files={"file": ("upload.jpg", data)}, timeout=60)
        assert r.status_code == status, (route, r.text)
        assert r.json()["error"]["code"] == code
        assert "upload.jpg" in r.json()["error"]["message"]


def test_limits_and_fields_are_the_predict_ones(server):
    too_big = make.noise_png(size=(1200, 1200))
    assert len(too_big) > server.settings.max_upload_bytes
    r = explain(server.url, too_big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    many = [make.png()] * (server.settings.max_images_per_request + 1)
    r = explain(server.url, many)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_images"
    r = httpx.post(f"{server.url}/explain", files={"image": ("a.jpg", b"x")}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["code"] == "missing_file"
    r = httpx.post(f"{server.url}/explain", json={}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize(
    "params, match",
    [
        ({"class": "unicorn"}, "unknown class 'unicorn'"),
        ({"class": "10"}, "class 10 is out of range"),
        ({"class": "-1"}, "out of range"),
        ({"blocks": "8"}, "block 8 is out of range: this model has blocks 1 to 7"),
        ({"blocks": "0,3"}, "block 0 is out of range"),
        ({"blocks": "six"}, "block numbers separated by commas"),
        ({"blocks": ","}, "blocks is empty"),
        ({"encoding": "jpeg"}, "encoding must be one or more of png, f16"),
        ({"branch_maps": "both"}, "branch_maps must be one or more of gradcam, strength"),
    ],
)
def test_a_bad_class_or_block_is_a_clear_422(server, pixels, params, match):
    r = explain(server.url, png(pixels[0]), **params)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_explain_argument" and match in error["message"]
    assert explain(server.url, png(pixels[0]), blocks="7").status_code == 200


def test_the_openapi_schema_states_the_response(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    op = schema["paths"]["/explain"]["post"]
    assert {p["name"] for p in op["parameters"]} >= {"class", "blocks", "encoding", "macro"}
    assert "multipart/form-data" in op["requestBody"]["content"]
    assert {"200", "413", "415", "422", "429", "503"} <= set(op["responses"])
    ref = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/ExplainResponse")
    map_image = schema["components"]["schemas"]["MapImage"]["properties"]
    assert "data URL" in map_image["png"]["description"]
    assert "float16" in map_image["f16"]["description"]


# ------------------------------------------------------------- queue, timeout, metrics


def _gauge(url: str, name: str) -> float:
    return metric_value(httpx.get(f"{url}/metrics").text, name)


def _warm(url: str, image: bytes) -> None:
    """Until the worker has started and built its explainer (429/503 meanwhile are fine)."""
    wait_until(lambda: explain(url, image, blocks="7").status_code == 200, 300, 0.5, "the worker")


def _delta(before: str, after: str, name: str) -> float:
    return metric_value(after, name) - metric_value(before, name)


def test_a_full_explain_queue_is_429_while_predict_answers(served_registry, golden_1):
    """queue 0: while the worker explains one request, the next gets 429 at once, and
    /predict answers every request meanwhile."""
    big = [png(p) for p in golden_1["images"][:64]]
    with LiveServer(
        registry_root=served_registry,
        model_name="tiny",
        device="cpu",
        backend="torchscript",
        explain="on",
        explain_queue=0,
        explain_timeout_s=300,
        max_images_per_request=64,
    ) as srv:
        _warm(srv.url, big[0])
        before = httpx.get(f"{srv.url}/metrics").text
        long: list[httpx.Response] = []
        thread = threading.Thread(target=lambda: long.append(explain(srv.url, big, timeout=300)))
        thread.start()
        wait_until(lambda: _gauge(srv.url, "seednet_explain_running") == 1, 60, what="running")
        refused = explain(srv.url, big[0])
        predicted = [
            httpx.post(f"{srv.url}/predict", files={"file": ("a.png", big[i])}, timeout=60)
            for i in range(5)
        ]
        still_running = _gauge(srv.url, "seednet_explain_running") == 1
        thread.join(300)
        metrics = httpx.get(f"{srv.url}/metrics").text
    assert still_running, "the long explanation ended before the checks: make it longer"
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "explain_queue_full"
    assert int(refused.headers["retry-after"]) >= 1
    assert [r.status_code for r in predicted] == [200] * 5
    assert long[0].status_code == 200 and len(long[0].json()["explanations"]) == 64
    assert _delta(before, metrics, 'seednet_explanations_total{outcome="queue_full"}') == 1
    assert _delta(before, metrics, 'seednet_explanations_total{outcome="done"}') == 1
    assert _delta(before, metrics, "seednet_explained_images_total") == 64


@pytest.mark.slow
def test_an_explanation_past_its_deadline_is_503_and_never_computed(served_registry, golden_1):
    big = [png(p) for p in golden_1["images"][:64]]
    with LiveServer(
        registry_root=served_registry,
        model_name="tiny",
        device="cpu",
        backend="torchscript",
        explain="on",
        explain_queue=4,
        explain_timeout_s=0.5,
        max_images_per_request=64,
    ) as srv:
        _warm(srv.url, big[0])
        before = httpx.get(f"{srv.url}/metrics").text

        async def both():
            async with httpx.AsyncClient(timeout=300) as client:

                async def post(files):
                    parts = [("files", (f"{i}.png", f)) for i, f in enumerate(files)]
                    return await client.post(f"{srv.url}/explain", files=parts)

                first = asyncio.create_task(post(big))
                await asyncio.sleep(0.2)  # the big one has the worker
                return await asyncio.gather(first, post(big[:1]))

        t0 = time.monotonic()
        slow, waiting = asyncio.run(both())
        elapsed = time.monotonic() - t0
        wait_until(lambda: _gauge(srv.url, "seednet_explain_running") == 0, 300, what="idle")
        metrics = httpx.get(f"{srv.url}/metrics").text
        after = explain(srv.url, big[0], blocks="7")
    for r in (slow, waiting):
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "explain_timeout"
        assert int(r.headers["retry-after"]) >= 1
    assert elapsed < 30, "a timed-out request was kept waiting"
    assert "was not computed" in waiting.json()["error"]["message"]
    assert _delta(before, metrics, 'seednet_explanations_total{outcome="timeout"}') == 2
    # the big one ran to its end in the worker (its answer dropped), the waiting one never ran
    assert _delta(before, metrics, "seednet_explained_images_total") == 0
    assert _delta(before, metrics, "seednet_explain_seconds_count") == 0
    assert after.status_code == 200  # and the worker serves the next one


# ------------------------------------------------------------------ versions, off


def test_a_promote_rebuilds_the_explainer_for_the_new_version(
    served_registry, tmp_path, pixels, local_explainer, caplog
):
    """The swap builds tiny@2's explainer in the worker before any request asks for it;
    explanations after the promote are tiny@2's."""
    caplog.set_level(logging.INFO, logger="seednet.explain")
    root = tmp_path / "registry"
    shutil.copytree(served_registry, root)
    with LiveServer(
        registry_root=root,
        model_name="tiny",
        device="cpu",
        backend="torchscript",
        admin_token=ADMIN_TOKEN,
        explain="on",
    ) as srv:
        before = explain(srv.url, png(pixels[0]), encoding="f16", blocks="7")
        r = httpx.post(
            f"{srv.url}/models/tiny/promote",
            json={"version": "2", "alias": "production"},
            headers=ADMIN,
            timeout=120,
        )
        assert r.status_code == 200, r.text
        wait_until(
            lambda: any("tiny@2 ready" in m for m in caplog.messages), 120, 0.1, "the rebuild"
        )
        after = explain(srv.url, png(pixels[0]), encoding="f16", blocks="7")
    assert before.json()["model"]["version"] == "1"
    assert after.status_code == 200 and after.json()["model"]["version"] == "2"
    for version, response in (("1", before), ("2", after)):
        want = local_explainer(version).explain(pixels[:1], blocks=[7])
        e = response.json()["explanations"][0]
        probs = [e["prediction"]["probabilities"][c] for c in CLASSES]
        np.testing.assert_allclose(probs, want["probabilities"][0], atol=1e-5)
        np.testing.assert_allclose(
            f16(e["blocks"][0]["gradcam"]), want["gradcam"][0, 0], atol=F16_TOLERANCE
        )


def test_with_explanations_off_explain_is_404_and_predict_works(served_registry, pixels):
    with LiveServer(
        registry_root=served_registry,
        model_name="tiny",
        device="cpu",
        backend="torchscript",  # (auto would record its choice in the shared registry)
        explain="off",
    ) as srv:
        r = explain(srv.url, png(pixels[0]))
        ok = httpx.post(f"{srv.url}/predict", files={"file": ("a.png", png(pixels[0]))})
    assert r.status_code == 404 and r.json()["error"]["code"] == "explanations_off"
    assert "SEEDNET_EXPLAIN" in r.json()["error"]["message"]
    assert ok.status_code == 200
