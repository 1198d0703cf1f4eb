"""The HTTP service, end to end: a real uvicorn, a real registry, a really trained tiny model."""

from __future__ import annotations

import asyncio
import re
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image

from tests import image_factory as make
from tests.conftest import ADMIN_TOKEN, LiveServer

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def post_file(url: str, data: bytes, name: str = "image.jpg", **params) -> httpx.Response:
    return httpx.post(f"{url}/predict", files={"file": (name, data)}, params=params, timeout=60)


def metric_value(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def assert_prediction(p: dict) -> None:
    assert p["label"] in CLASSES
    assert set(p["probabilities"]) == set(CLASSES)
    assert abs(sum(p["probabilities"].values()) - 1) < 1e-4
    assert p["confidence"] == pytest.approx(max(p["probabilities"].values()))
    assert p["top_k"][0]["label"] == p["label"]
    assert len(p["attention"]) == 7
    assert [a["block"] for a in p["attention"]] == list(range(1, 8))
    for a in p["attention"]:
        assert len(a["weights"]) == 2
        assert abs(sum(a["weights"]) - 1) < 1e-5


def test_predict_one_real_jpeg(server, cifar_dir):
    data = (cifar_dir / "test" / "cat" / "0000.jpg").read_bytes()
    r = post_file(server.url, data, "cat.jpg", top_k=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {
        "name": "tiny",
        "version": "1",
        "backend": "torchscript",
        "device": "cpu",
    }
    (p,) = body["predictions"]
    assert p["filename"] == "cat.jpg"
    assert len(p["top_k"]) == 5
    assert p["original_size"] == [32, 32]
    assert p["model_input"] is None
    assert_prediction(p)


def test_predict_matches_the_registry_golden_outputs(server, served_registry):
    """The service's numbers are the model's numbers: compare with the recorded eager run."""
    from safetensors.torch import load_file

    golden = load_file(str(served_registry / "tiny" / "1" / "golden.safetensors"))
    files = []
    for i in range(8):
        buf = __import__("io").BytesIO()
        Image.fromarray(golden["images"][i].numpy().transpose(1, 2, 0)).save(buf, "PNG")
        files.append(("files", (f"g{i}.png", buf.getvalue())))
    r = httpx.post(f"{server.url}/predict", files=files, timeout=60)
    assert r.status_code == 200, r.text
    for i, p in enumerate(r.json()["predictions"]):
        probs = np.array([p["probabilities"][c] for c in CLASSES])
        assert np.abs(probs - golden["probabilities"][i].numpy()).max() < 1e-4
        att = np.array([a["weights"] for a in p["attention"]])
        assert np.abs(att - golden["attention"][i].numpy()).max() < 1e-4


def test_predict_several_files_keeps_order(server, cifar_dir):
    paths = [cifar_dir / "test" / c / "0001.jpg" for c in ("ship", "frog", "truck")]
    files = [("files", (p.parent.name + ".jpg", p.read_bytes())) for p in paths]
    r = httpx.post(f"{server.url}/predict", files=files, timeout=60)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["filename"] for p in preds] == ["ship.jpg", "frog.jpg", "truck.jpg"]
    single = [post_file(server.url, p.read_bytes()).json()["predictions"][0] for p in paths]
    for many, one in zip(preds, single, strict=True):
        assert many["probabilities"] == pytest.approx(one["probabilities"], abs=1e-5)


def test_include_input_returns_the_32x32_model_view(server):
    r = post_file(server.url, make.jpeg(size=(200, 100), color=(250, 10, 10)), include_input="true")
    p = r.json()["predictions"][0]
    assert p["original_size"] == [200, 100]
    assert p["model_input"].startswith("data:image/png;base64,")
    import base64
    import io

    img = Image.open(io.BytesIO(base64.b64decode(p["model_input"].split(",", 1)[1])))
    assert img.size == (32, 32)
    r_, g_, b_ = np.asarray(img).reshape(-1, 3).mean(0)
    assert r_ > 200 and g_ < 60 and b_ < 60


@pytest.mark.parametrize(
    "maker, status, code",
    [
        (make.truncated_jpeg, 422, "corrupt_image"),
        (lambda: make.png_bomb_header(100000, 100000), 413, "too_many_pixels"),
        (make.zip_renamed_jpg, 415, "unsupported_media_type"),
        (make.empty, 422, "empty_file"),
        (make.text_file, 415, "unsupported_media_type"),
        (make.tiff, 415, "unsupported_media_type"),
    ],
    ids=["truncated", "bomb", "zip", "empty", "text", "tiff"],
)
def test_bad_input_gets_a_clear_4xx_and_the_next_request_works(server, maker, status, code):
    r = post_file(server.url, maker(), "upload.jpg")
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    assert err["status"] == status
    assert "upload.jpg" in err["message"] and len(err["message"]) > 15
    ok = post_file(server.url, make.jpeg())
    assert ok.status_code == 200


@pytest.mark.parametrize(
    "maker",
    [
        make.cmyk_jpeg,
        make.png16,
        make.animated_gif,
        make.exif_rotated_jpeg,
        make.rgba_png,
        make.la_png,
        make.palette_png,
        make.webp,
        make.bmp,
        make.gif,
    ],
    ids=lambda f: f.__name__,
)
def test_unusual_but_valid_images_are_classified(server, maker):
    r = post_file(server.url, maker(), "ok.img")
    assert r.status_code == 200, r.text
    assert_prediction(r.json()["predictions"][0])


def test_exif_rotation_is_applied(server):
    p = post_file(server.url, make.exif_rotated_jpeg()).json()["predictions"][0]
    w, h = p["original_size"]
    assert h > w  # the stored landscape image is upright portrait after EXIF orientation


def test_over_limit_file_bytes_is_413(server):
    big = make.noise_png(size=(1200, 1200))
    assert len(big) > server.settings.max_upload_bytes
    r = post_file(server.url, big, "big.png")
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "file_too_large"


def test_too_many_images_is_413(server):
    data = make.jpeg()
    files = [("files", (f"{i}.jpg", data)) for i in range(41)]
    r = httpx.post(f"{server.url}/predict", files=files, timeout=60)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "too_many_images"


@pytest.mark.parametrize(
    "kwargs, code",
    [
        ({"files": {"image": ("a.jpg", b"x")}}, "missing_file"),
        ({"data": {"file": "not a file"}}, "invalid_request"),
        ({"content": b"{}", "headers": {"content-type": "application/json"}}, "invalid_request"),
    ],
    ids=["wrong-field", "urlencoded", "json"],
)
def test_missing_or_wrong_field_is_422(server, kwargs, code):
    r = httpx.post(f"{server.url}/predict", timeout=30, **kwargs)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == code


def test_bad_query_parameter_is_422_json(server):
    r = post_file(server.url, make.jpeg(), top_k=0)
    assert r.status_code == 422
    assert "top_k" in r.json()["error"]["message"]


def test_unknown_route_is_404_json(server):
    r = httpx.get(f"{server.url}/no-such-thing")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_health_models_and_openapi(server):
    assert httpx.get(f"{server.url}/health/live").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/health/ready").json()
    assert ready["status"] == "ready" and ready["model"]["name"] == "tiny"
    models = httpx.get(f"{server.url}/models").json()
    assert models["serving"]["version"] in ("1", "2")
    (tiny,) = [m for m in models["models"] if m["name"] == "tiny"]
    assert [v["version"] for v in tiny["versions"]] == ["1", "2"]
    assert "test_accuracy" in tiny["versions"][0]["metrics"]
    spec = httpx.get(f"{server.url}/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert {"file", "files"} <= set(body["schema"]["properties"])
    assert httpx.get(f"{server.url}/docs").status_code == 200


def test_attention_reference_data(server):
    r = httpx.get(f"{server.url}/attention/reference")
    assert r.status_code == 200
    data = r.json()
    assert data["blocks"] == 7
    for rows in data["by_true_class"].values():
        assert len(rows) == 7
        assert all(abs(sum(w) - 1) < 1e-4 for w in rows)


def test_admin_routes_need_the_token(server):
    r = httpx.post(f"{server.url}/models/reload")
    assert r.status_code == 401
    r = httpx.post(f"{server.url}/models/reload", headers={"authorization": "Bearer wrong"})
    assert r.status_code == 403
    r = httpx.post(
        f"{server.url}/models/tiny/promote",
        json={"version": "99"},
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert r.status_code == 404
    r = httpx.post(
        f"{server.url}/models/reload",
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=120,
    )
    assert r.status_code == 200


def test_64_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, cifar_dir):
    paths = sorted((cifar_dir / "test").glob("*/000[0-6].jpg"))[:64]
    expected = {
        p: post_file(server.url, p.read_bytes()).json()["predictions"][0]["probabilities"]
        for p in paths[:8]
    }
    before = httpx.get(f"{server.url}/metrics").text

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:

            async def one(p):
                r = await client.post(
                    f"{server.url}/predict", files={"file": (p.name, p.read_bytes())}
                )
                return p, r

            return await asyncio.gather(*(one(p) for p in paths))

    results = asyncio.run(run())
    assert all(r.status_code == 200 for _, r in results)
    for p, r in results:
        pred = r.json()["predictions"][0]
        assert_prediction(pred)
        if p in expected:
            assert pred["probabilities"] == pytest.approx(expected[p], abs=1e-5)
    after = httpx.get(f"{server.url}/metrics").text
    batches = metric_value(after, "seednet_batch_size_count") - metric_value(
        before, "seednet_batch_size_count"
    )
    images = metric_value(after, "seednet_batch_size_sum") - metric_value(
        before, "seednet_batch_size_sum"
    )
    assert images == 64
    assert batches < 64, "no batch held more than one image"
    # the Prometheus histogram bucket "le=1" counts single-image batches
    assert re.search(
        r'seednet_requests_total\{method="POST",protocol="rest",route="/predict",status="200"\}',
        after,
    )


@pytest.mark.slow
def test_promote_during_load_has_no_failed_request(served_registry, tmp_path, cifar_dir):
    root = tmp_path / "registry"
    shutil.copytree(served_registry, root)
    data = (cifar_dir / "test" / "dog" / "0000.jpg").read_bytes()
    with LiveServer(
        registry_root=root,
        model_name="tiny",
        device="cpu",
        backend="torchscript",
        admin_token=ADMIN_TOKEN,
    ) as srv:

        async def run():
            async with httpx.AsyncClient(timeout=120) as client:
                stop = asyncio.Event()
                versions: list[str] = []
                failures: list[int] = []

                async def load():
                    while not stop.is_set():
                        r = await client.post(f"{srv.url}/predict", files={"file": ("d.jpg", data)})
                        if r.status_code != 200:
                            failures.append(r.status_code)
                        else:
                            versions.append(r.json()["model"]["version"])

                workers = [asyncio.create_task(load()) for _ in range(8)]
                await asyncio.sleep(0.5)
                r = await client.post(
                    f"{srv.url}/models/tiny/promote",
                    json={"version": "2", "alias": "production"},
                    headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
                )
                await asyncio.sleep(0.5)
                stop.set()
                await asyncio.gather(*workers)
                return r, versions, failures

        r, versions, failures = asyncio.run(run())
        assert r.status_code == 200, r.text
        assert r.json()["serving"]["version"] == "2"
        assert failures == []
        assert versions[0] == "1" and versions[-1] == "2"
        from registry import Registry

        assert Registry(root).aliases("tiny")["production"] == "2"
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert (
            'seednet_model_info{backend="torchscript",device="cpu",name="tiny",version="2"}'
            in metrics
        )


@pytest.mark.slow
def test_reload_under_load_never_overlaps_a_batch(served_registry, tmp_path, cifar_dir):
    """Load, warm-up (and CUDA-graph capture) run on the model thread, between batches.

    Catches a load moved back to a thread of its own (``asyncio.to_thread``): its span
    would then overlap the batches that keep running beside it.
    """
    root = tmp_path / "registry"
    shutil.copytree(served_registry, root)
    data = (cifar_dir / "test" / "cat" / "0000.jpg").read_bytes()
    with LiveServer(
        registry_root=root, model_name="tiny", device="cpu", admin_token=ADMIN_TOKEN
    ) as srv:
        spans: list[tuple[str, float, float]] = []
        stats = srv.app.state.service.batcher.stats
        stats.on_span = lambda kind, start, end: spans.append((kind, start, end))

        async def run():
            async with httpx.AsyncClient(timeout=120) as client:
                stop = asyncio.Event()
                statuses: list[int] = []

                async def load():
                    while not stop.is_set():
                        r = await client.post(f"{srv.url}/predict", files={"file": ("c.jpg", data)})
                        statuses.append(r.status_code)

                workers = [asyncio.create_task(load()) for _ in range(8)]
                await asyncio.sleep(0.5)
                reloads = [
                    await client.post(
                        f"{srv.url}/models/reload",
                        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
                    )
                    for _ in range(2)
                ]
                await asyncio.sleep(0.3)
                stop.set()
                await asyncio.gather(*workers)
                return reloads, statuses

        reloads, statuses = asyncio.run(run())
    assert [r.status_code for r in reloads] == [200, 200]
    assert statuses and set(statuses) == {200}
    loads = [(a, b) for kind, a, b in spans if kind == "load"]
    batches = [(a, b) for kind, a, b in spans if kind == "batch"]
    assert len(loads) == 2
    for la, lb in loads:
        # traffic ran on both sides of each load, and never during it
        assert any(b <= la for _, b in batches) and any(a >= lb for a, _ in batches)
        overlapping = [(a, b) for a, b in batches if a < lb and b > la]
        assert overlapping == [], f"batches ran during a model load: {overlapping}"


def test_serve_bench_runs_against_the_service(server, cifar_dir):
    import subprocess
    import sys

    from tests.conftest import REPO

    r = subprocess.run(
        [
            sys.executable,
            "bench/serve_bench.py",
            "--url",
            server.url,
            "--kinds",
            "single",
            "multi",
            "--multi-images",
            "4",
            "--concurrency",
            "2",
            "--requests",
            "6",
            "--warmup",
            "0",
            "--images",
            str(cifar_dir / "test"),
            "--max-images",
            "40",
            "--metrics",
            "--fail-on-error",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line for line in r.stdout.splitlines() if line.split()[:1] in (["single"], ["multi"])]
    assert len(rows) == 2 and all(line.split()[4] == "0" for line in rows)  # no errors
