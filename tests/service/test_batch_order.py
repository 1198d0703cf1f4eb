"""A request with more images than one batch holds gets its rows back in its own order.

The server here takes at most ``BATCH`` (4) images per forward pass, so a request of
``IMAGES`` (10) real CIFAR-10 test JPEGs is split into chunks of 4, 4 and 2 that run in
separate batches and are put back together. Every row must be the answer that image
gets when it is sent alone, on ``/predict``, on ``/v2`` (tritonclient.http) and on gRPC
(tritonclient.grpc), for encoded files and for pixel tensors. Only the wire protocols
are used: real uvicorn, real clients, real files.
"""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image

from seednet.constants import CIFAR10_CLASSES
from tests.conftest import LiveServer

BATCH = 4
IMAGES = 10  # chunks of 4, 4 and 2
# One forward pass of 4 images and one of 1 differ by float rounding only; another
# image's row differs by far more (checked by test_the_images_really_differ).
ATOL = 1e-5


@pytest.fixture(scope="module")
def small_batches(served_registry):
    """tiny@1 behind a server whose batches hold at most BATCH images."""
    with LiveServer(
        registry_root=served_registry,
        model_name="tiny",
        device="cpu",
        backend="torchscript",
        max_batch_size=BATCH,
        max_batch_wait_ms=5,
        max_images_per_request=IMAGES * 2,
        grpc_port=0,
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def jpegs(cifar_dir) -> list[bytes]:
    """Ten different real test images, one of each class."""
    return [(cifar_dir / "test" / c / "0002.jpg").read_bytes() for c in CIFAR10_CLASSES]


@pytest.fixture(scope="module")
def pixels(jpegs) -> np.ndarray:
    """The same images as a uint8 NCHW tensor (what a Triton client sends)."""
    hwc = np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs])
    return np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))


def rows(predictions: list[dict]) -> np.ndarray:
    """/predict's probabilities as an (images, classes) array in the model's class order."""
    return np.array([[p["probabilities"][c] for c in CIFAR10_CLASSES] for p in predictions])


def predict(url: str, files: list[bytes]) -> np.ndarray:
    r = httpx.post(
        f"{url}/predict",
        files=[("files", (f"{i}.jpg", f)) for i, f in enumerate(files)],
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return rows(r.json()["predictions"])


@pytest.fixture(scope="module")
def alone(small_batches, jpegs) -> np.ndarray:
    """Each JPEG's probabilities when it is the only image of its request."""
    return np.concatenate([predict(small_batches.url, [j]) for j in jpegs])


@pytest.fixture
def http(small_batches):
    client = httpclient.InferenceServerClient(small_batches.url.removeprefix("http://"))
    yield client
    client.close()
    client.close = lambda: None  # tritonclient's __del__ would close again from another thread


@pytest.fixture
def grpc(small_batches):
    client = grpcclient.InferenceServerClient(small_batches.grpc_url)
    yield client
    client.close()


def bytes_tensor(files: list[bytes]) -> np.ndarray:
    return np.array(files, dtype=np.object_).reshape(len(files), 1)


def batch_histogram(url: str) -> tuple[float, float]:
    """(forward passes of at most BATCH images, all forward passes) from /metrics."""
    text = httpx.get(f"{url}/metrics").text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line[:1] != "#")
    return float(values[f'seednet_batch_size_bucket{{le="{BATCH}.0"}}']), float(
        values["seednet_batch_size_count"]
    )


def test_the_images_really_differ(alone):
    """Rows in the wrong order would be noticed: every two images answer differently."""
    assert alone.shape == (IMAGES, len(CIFAR10_CLASSES))
    gaps = [np.abs(alone[i] - alone[j]).max() for i in range(IMAGES) for j in range(i)]
    assert min(gaps) > 100 * ATOL


def test_predict_rows_follow_the_files_order(small_batches, jpegs, alone):
    before = batch_histogram(small_batches.url)
    got = predict(small_batches.url, jpegs)
    np.testing.assert_allclose(got, alone, rtol=0, atol=ATOL)
    reversed_order = predict(small_batches.url, jpegs[::-1])
    np.testing.assert_allclose(reversed_order, alone[::-1], rtol=0, atol=ATOL)
    after = batch_histogram(small_batches.url)
    small, total = after[0] - before[0], after[1] - before[1]
    assert small == total >= 6, "each request of 10 images ran as at least 3 batches of <= 4"


def test_concurrent_large_requests_each_get_their_own_rows_in_order(small_batches, jpegs, alone):
    """Chunks of several split requests share batches; each still gets its rows, in order."""
    orders = [np.random.default_rng(seed).permutation(IMAGES) for seed in range(4)]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=small_batches.url, timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/predict",
                        files=[("files", (f"{i}.jpg", jpegs[i])) for i in order],
                    )
                    for order in orders
                )
            )

    for order, r in zip(orders, asyncio.run(run()), strict=True):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(rows(r.json()["predictions"]), alone[order], rtol=0, atol=ATOL)


def test_v2_rows_follow_the_request_order(http, jpegs, pixels, alone):
    files = httpclient.InferInput("image_bytes", [IMAGES, 1], "BYTES")
    files.set_data_from_numpy(bytes_tensor(jpegs), binary_data=True)
    got = http.infer("tiny", [files]).as_numpy("probabilities")
    np.testing.assert_allclose(got, alone, rtol=0, atol=ATOL)

    def tensor(batch: np.ndarray) -> np.ndarray:
        i = httpclient.InferInput("images", list(batch.shape), "UINT8")
        i.set_data_from_numpy(batch, binary_data=True)
        return http.infer("tiny", [i]).as_numpy("probabilities")

    tensor_alone = np.concatenate([tensor(pixels[i : i + 1]) for i in range(IMAGES)])
    np.testing.assert_allclose(tensor(pixels), tensor_alone, rtol=0, atol=ATOL)


def test_grpc_rows_follow_the_request_order(grpc, jpegs, pixels, alone):
    files = grpcclient.InferInput("image_bytes", [IMAGES, 1], "BYTES")
    files.set_data_from_numpy(bytes_tensor(jpegs))
    got = grpc.infer("tiny", [files]).as_numpy("probabilities")
    np.testing.assert_allclose(got, alone, rtol=0, atol=ATOL)

    def tensor(batch: np.ndarray) -> np.ndarray:
        i = grpcclient.InferInput("images", list(batch.shape), "UINT8")
        i.set_data_from_numpy(batch)
        return grpc.infer("tiny", [i]).as_numpy("probabilities")

    tensor_alone = np.concatenate([tensor(pixels[i : i + 1]) for i in range(IMAGES)])
    np.testing.assert_allclose(tensor(pixels), tensor_alone, rtol=0, atol=ATOL)
