"""The HTTP service, end to end: a real uvicorn, a real registry, a really trained tiny model."""

from __future__ import annotations

import asyncio
import io
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


def golden_pngs(golden: dict, count: int) -> list:
    files = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(golden["images"][i].transpose(1, 2, 0)).save(buf, "PNG")
        files.append(("files", (f"g{i}.png", buf.getvalue())))
    return files


def assert_golden(body: dict, golden: dict, count: int) -> None:
    """Exactly ``count`` predictions, each equal to the recorded eager outputs."""
    assert len(body["predictions"]) == count
    for i, p in enumerate(body["predictions"]):
        assert p["filename"] == f"g{i}.png"
        probs = np.array([p["probabilities"][c] for c in CLASSES])
        assert np.abs(probs - golden["probabilities"][i]).max() < 1e-4
        att = np.array([a["weights"] for a in p["attention"]])
        assert np.abs(att - golden["attention"][i]).max() < 1e-4


def test_predict_matches_the_registry_golden_outputs(server, golden_1):
    """The service's numbers are the model's numbers: compare with the recorded eager run."""
    r = httpx.post(f"{server.url}/predict", files=golden_pngs(golden_1, 8), timeout=60)
    assert r.status_code == 200, r.text
    assert_golden(r.json(), golden_1, 8)


@pytest.mark.parametrize("backend", ["onnx", "eager"])
def test_the_other_backends_serve_the_golden_outputs_over_http(served_registry, golden_1, backend):
    with LiveServer(
        registry_root=served_registry, model_name="tiny", device="cpu", backend=backend
    ) as srv:
        r = httpx.post(f"{srv.url}/predict", files=golden_pngs(golden_1, 8), timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["model"]["backend"] == backend
    assert_golden(r.json(), golden_1, 8)


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
        (make.truncated_png, 422, "corrupt_image"),
        (make.png_bad_header_crc, 422, "corrupt_image"),
        (lambda: make.png_bomb_header(100000, 100000), 413, "too_many_pixels"),
        (make.zip_renamed_jpg, 415, "unsupported_media_type"),
        (make.empty, 422, "empty_file"),
        (make.text_file, 415, "unsupported_media_type"),
        (make.tiff, 415, "unsupported_media_type"),
    ],
    ids=["truncated", "truncated-png", "bad-crc-png", "bomb", "zip", "empty", "text", "tiff"],
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


def padded_png(size: int) -> bytes:
    """A valid PNG of exactly ``size`` bytes (decoders stop at IEND; the rest is ignored)."""
    data = make.png()
    return data + b"\0" * (size - len(data))


def test_the_per_file_byte_limit_is_exact_over_http(server):
    limit = server.settings.max_upload_bytes
    at = post_file(server.url, padded_png(limit), "at-limit.png")
    assert at.status_code == 200, at.text
    over = post_file(server.url, padded_png(limit + 1), "over.png")
    assert over.status_code == 413
    assert over.json()["error"]["code"] == "file_too_large"
    assert "over.png" in over.json()["error"]["message"]


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
    assert models["serving"]["version"] == "1"
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
    assert r.json()["error"]["code"] == "unauthorized"
    r = httpx.post(f"{server.url}/models/reload", headers={"authorization": "Bearer wrong"})
    assert r.status_code == 403
    assert r.json()["error"]["message"] == "the admin token is not valid"
    r = httpx.post(
        f"{server.url}/models/tiny/promote",
        json={"version": "99"},
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found" and "99" in r.json()["error"]["message"]
    r = httpx.post(
        f"{server.url}/models/tiny/promote",
        json={"version": "1", "alias": "7"},
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "invalid_name"
    assert httpx.get(f"{server.url}/models").json()["models"][0]["aliases"] == {"production": "1"}


def asgi_client(**overrides) -> httpx.AsyncClient:
    """The real app without its lifespan: no model is loaded, as during start-up."""
    from service.app import create_app
    from service.config import Settings

    app = create_app(Settings(**overrides))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")


def test_before_a_model_is_loaded_predict_and_ready_answer_503(served_registry):
    async def run():
        async with asgi_client(registry_root=served_registry, model_name="tiny") as client:
            ready = await client.get("/health/ready")
            pred = await client.post("/predict", files={"file": ("a.jpg", make.jpeg())})
            live = await client.get("/health/live")
            return ready, pred, live

    ready, pred, live = asyncio.run(run())
    assert ready.status_code == 503 and ready.json() == {"status": "loading"}
    assert pred.status_code == 503
    assert pred.json()["error"] == {
        "code": "not_ready",
        "message": "the model is still loading; retry shortly",
        "status": 503,
    }
    assert live.status_code == 200


def test_admin_routes_answer_403_when_no_token_is_configured(served_registry):
    async def run():
        async with asgi_client(registry_root=served_registry, model_name="tiny") as client:
            return await client.post(
                "/models/reload", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
            )

    r = asyncio.run(run())
    assert r.status_code == 403
    assert "disabled" in r.json()["error"]["message"]


def raw_request(url: str, head: str, body: bytes = b"") -> tuple[int, dict]:
    """Send exactly these bytes (a client can lie about Content-Length) with
    ``Connection: close``, read until the server closes, return status and JSON body."""
    import json
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    header, _, payload = data.partition(b"\r\n\r\n")
    return int(header.split(b" ", 2)[1]), json.loads(payload)


def test_a_declared_body_over_the_limit_is_413_before_it_is_sent(server):
    s = server.settings
    declared = s.max_images_per_request * s.max_upload_bytes + 10**6
    status, body = raw_request(
        server.url,
        "POST /predict HTTP/1.1\nHost: x\nContent-Type: multipart/form-data; boundary=b\n"
        f"Content-Length: {declared}\nConnection: close\n",
    )
    assert status == 413
    assert body["error"]["code"] == "payload_too_large"
    assert str(declared) in body["error"]["message"]
    assert post_file(server.url, make.jpeg()).status_code == 200


def test_a_malformed_multipart_body_is_422(server):
    body = b"--b\r\nContent-Disposition: form-data; name=file; filename=a.jpg\r\n\r\nxx"
    r = httpx.post(
        f"{server.url}/predict",
        content=body,
        headers={"content-type": "multipart/form-data; boundary=b"},
        timeout=30,
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] in ("invalid_multipart", "missing_file")
    assert post_file(server.url, make.jpeg()).status_code == 200


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
    ok = 'seednet_requests_total{method="POST",protocol="rest",route="/predict",status="200"}'
    assert metric_value(after, ok) - metric_value(before, ok) == 64


async def under_load(url: str, files: list, action, workers: int = 8, settle: int = 16):
    """Keep ``workers`` clients posting ``files`` to /predict; run ``action(client)`` once
    ``settle`` answers have come back, and stop ``settle`` answers after it returned.

    Returns (action's result, [(status, body)] of every request in the order answered).
    """
    answers: list[tuple[int, dict]] = []
    async with httpx.AsyncClient(timeout=120) as client:
        stop = asyncio.Event()

        async def post_forever():
            while not stop.is_set():
                r = await client.post(f"{url}/predict", files=files)
                answers.append((r.status_code, r.json()))

        async def answered(n: int):
            while len(answers) < n:
                await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(post_forever()) for _ in range(workers)]
        await asyncio.wait_for(answered(settle), 120)
        result = await action(client)
        await asyncio.wait_for(answered(len(answers) + settle), 120)
        stop.set()
        await asyncio.gather(*tasks)
    return result, answers


ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.mark.slow
def test_promote_during_load_swaps_to_the_new_weights_with_no_failed_request(
    served_registry, tmp_path, golden_1
):
    """tiny@2 has other weights than tiny@1: every answer must be the one of the version it
    names, and after the promote the new version's numbers are served."""
    from registry import Registry

    root = tmp_path / "registry"
    shutil.copytree(served_registry, root)
    files = golden_pngs(golden_1, 1)
    with LiveServer(
        registry_root=root,
        model_name="tiny",
        device="cpu",
        backend="torchscript",  # the expected numbers below are TorchScript's
        admin_token=ADMIN_TOKEN,
    ) as srv:
        # what each version answers for this image, from models loaded outside the server
        from service.lifecycle.loading import load_backend

        reg = Registry(root)
        expected = {
            v: load_backend(reg, reg.resolve("tiny", v), "torchscript", "cpu").run(
                golden_1["images"][:1]
            )["probabilities"][0]
            for v in ("1", "2")
        }
        assert np.abs(expected["1"] - expected["2"]).max() > 1e-3, "tiny@1 == tiny@2"

        async def promote(client):
            return await client.post(
                f"{srv.url}/models/tiny/promote",
                json={"version": "2", "alias": "production"},
                headers=ADMIN,
            )

        r, answers = asyncio.run(under_load(srv.url, files, promote))
        metrics = httpx.get(f"{srv.url}/metrics").text
    assert r.status_code == 200, r.text
    assert r.json()["serving"]["version"] == "2"
    assert [status for status, _ in answers if status != 200] == []
    versions = [body["model"]["version"] for _, body in answers]
    assert versions[0] == "1" and versions[-1] == "2"
    for _, body in answers:
        probs = body["predictions"][0]["probabilities"]
        got = np.array([probs[c] for c in CLASSES])
        assert np.abs(got - expected[body["model"]["version"]]).max() < 1e-5
    assert Registry(root).aliases("tiny")["production"] == "2"
    assert 'seednet_model_info{backend="torchscript",device="cpu",name="tiny",version="2"}' in (
        metrics
    )


def flip_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("filename", ["model.ts", "weights.safetensors"])
def test_a_corrupted_version_is_never_promoted_over_http(served_registry, tmp_path, filename):
    """The default backend is TorchScript: its own file and the weights it derives from
    are both checked before a version serves."""
    from registry import Registry

    root = tmp_path / "registry"
    shutil.copytree(served_registry, root)
    flip_byte(root / "tiny/2" / filename)
    with LiveServer(
        registry_root=root, model_name="tiny", device="cpu", admin_token=ADMIN_TOKEN
    ) as srv:
        r = httpx.post(
            f"{srv.url}/models/tiny/promote",
            json={"version": "2", "alias": "production"},
            headers=ADMIN,
            timeout=120,
        )
        after = post_file(srv.url, make.jpeg())
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "integrity_error"
    assert filename in r.json()["error"]["message"]
    assert str(root) not in r.json()["error"]["message"]
    assert after.status_code == 200 and after.json()["model"]["version"] == "1"
    assert Registry(root).aliases("tiny")["production"] == "1"


@pytest.mark.slow
def test_reload_under_load_never_overlaps_a_batch(served_registry, tmp_path, cifar_dir):
    """Load, warm-up (and CUDA-graph capture) run on the model thread, between batches.

    Catches a load moved back to a thread of its own (``asyncio.to_thread``): its span
    would then overlap the batches that keep running beside it.
    """
    root = tmp_path / "registry"
    shutil.copytree(served_registry, root)
    files = {"file": ("c.jpg", (cifar_dir / "test" / "cat" / "0000.jpg").read_bytes())}
    with LiveServer(
        registry_root=root, model_name="tiny", device="cpu", admin_token=ADMIN_TOKEN
    ) as srv:
        spans: list[tuple[str, float, float]] = []
        stats = srv.app.state.service.plane.batcher.stats
        stats.on_span = lambda kind, start, end: spans.append((kind, start, end))

        async def reload_twice(client):
            return [await client.post(f"{srv.url}/models/reload", headers=ADMIN) for _ in range(2)]

        reloads, answers = asyncio.run(under_load(srv.url, files, reload_twice))
    assert [r.status_code for r in reloads] == [200, 200]
    assert {status for status, _ in answers} == {200}
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


def test_every_stage_of_a_request_is_timed(server):
    """read_body, decode, queue_wait, model, serialise: where a deployment spends time."""
    stages = ("read_body", "decode", "queue_wait", "model", "serialise")

    def counts() -> dict[str, float]:
        text = httpx.get(f"{server.url}/metrics").text
        return {
            s: metric_value(text, f'seednet_stage_seconds_count{{protocol="rest",stage="{s}"}}')
            for s in stages
        }

    before = counts()
    r = post_file(server.url, make.jpeg())
    after = counts()
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert {s: after[s] - before[s] for s in stages} == dict.fromkeys(stages, 1.0)
