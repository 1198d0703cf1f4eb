"""Rollouts against a real server: tiny@1 serves, tiny@2 (other weights) is the good
candidate, tiny@3 (tiny@1's weights with its class names shifted by one) the bad one.

Real CIFAR-10 test images go through /predict, /v2 and gRPC on a loopback uvicorn; the
rollout record lives in a registry in a temporary folder; the decisions are the
service's own, taken on the evidence of the traffic these tests send.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

from registry import Registry
from tests.conftest import ADMIN_TOKEN, LiveServer, wait_until

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def rollout_registry(tmp_path_factory, served_registry, tiny_run) -> Path:
    """tiny@1 (production), tiny@2 (the good candidate), tiny@3 (the bad one)."""
    from training.publish import publish_run

    base = tmp_path_factory.mktemp("rollouts")
    root = base / "registry"
    shutil.copytree(served_registry, root)
    bad_run = base / "shifted-names"
    shutil.copytree(tiny_run, bad_run)
    config = json.loads((bad_run / "config.json").read_text())
    names = config["class_names"]
    config["class_names"] = names[1:] + names[:1]  # every answer under its neighbour's name
    (bad_run / "config.json").write_text(json.dumps(config))
    assert publish_run(bad_run, "tiny", root, force=True).version == "3"
    return root


@pytest.fixture(scope="module")
def test_images(cifar_dir) -> list[tuple[str, bytes]]:
    """20 real test images of every class: (class, JPEG bytes)."""
    out = []
    for class_dir in sorted((cifar_dir / "test").iterdir()):
        for path in sorted(class_dir.iterdir())[:20]:
            out.append((class_dir.name, path.read_bytes()))
    return out


def serve(root: Path, **overrides) -> LiveServer:
    settings = {
        "registry_root": root,
        "model_name": "tiny",
        "device": "cpu",
        "backend": "torchscript",
        "admin_token": ADMIN_TOKEN,
        "rollout_poll_s": 0.2,
        "queue_timeout_ms": 60_000,  # a busy machine: these tests are not about admission
    }
    return LiveServer(**{**settings, **overrides})


def copy_of(rollout_registry: Path, tmp_path: Path) -> Path:
    root = tmp_path / "registry"
    shutil.copytree(rollout_registry, root)
    return root


def start(url: str, candidate: str, steps: list[dict], rule: dict, **extra) -> httpx.Response:
    body = {"candidate": candidate, "steps": steps, "rule": rule, **extra}
    return httpx.post(f"{url}/models/tiny/rollout", json=body, headers=ADMIN, timeout=120)


async def send(
    url: str,
    images: list[tuple[str, bytes]],
    n: int,
    concurrency: int = 4,
    headers=lambda i: {},
) -> list[tuple[int, dict, dict]]:
    """``n`` /predict requests (image ``i % len(images)``, headers ``headers(i)``), by
    ``concurrency`` clients: [(status, response headers, body)] in request order."""
    results: list = [None] * n
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    async with httpx.AsyncClient(timeout=120) as client:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                _, data = images[i % len(images)]
                r = await client.post(
                    f"{url}/predict", files={"file": ("x.jpg", data)}, headers=headers(i)
                )
                results[i] = (r.status_code, dict(r.headers), r.json())

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def version_of(result: tuple[int, dict, dict]) -> str:
    status, headers, body = result
    assert status == 200, body
    assert headers["x-model-version"] == body["model"]["version"]  # header and body agree
    return body["model"]["version"]


def rollout(url: str) -> dict:
    r = httpx.get(f"{url}/models/tiny/rollout", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------ the split


def test_a_canary_split_lands_within_tolerance_and_a_client_key_sticks(
    rollout_registry, tmp_path, test_images
):
    root = copy_of(rollout_registry, tmp_path)
    never = {"min_samples": 10**9}  # no decision: this test is about the split
    with serve(root) as srv:
        r = start(srv.url, "2", [{"mode": "canary", "percent": 30}], never)
        assert r.status_code == 200, r.text
        assert r.json()["converged"] is True and r.json()["running"] is True

        plain = asyncio.run(send(srv.url, test_images, 1000))
        versions = Counter(version_of(x) for x in plain)
        # 1,000 draws at 30 %: sd 1.45 points; +-5 points is 3.4 sd
        assert set(versions) == {"1", "2"} and abs(versions["2"] / 1000 - 0.30) < 0.05, versions

        keys = [f"client-{i}" for i in range(300)]
        keyed = asyncio.run(
            send(srv.url, test_images, 600, headers=lambda i: {"x-client-key": keys[i % 300]})
        )
        by_key: dict[str, set[str]] = {}
        for i, x in enumerate(keyed):
            by_key.setdefault(keys[i % 300], set()).add(version_of(x))
        assert all(len(v) == 1 for v in by_key.values()), "a client key changed version"
        share = sum(v == {"2"} for v in by_key.values()) / len(by_key)
        assert abs(share - 0.30) < 0.09, share  # 300 keys: sd 2.6 points

        pinned = asyncio.run(
            send(srv.url, test_images, 40, headers=lambda i: {"x-model-version": "2"})
        )
        assert {version_of(x) for x in pinned} == {"2"}
        r = httpx.post(
            f"{srv.url}/predict",
            files={"file": ("x.jpg", test_images[0][1])},
            headers={"x-model-version": "7"},
        )
        assert r.status_code == 400 and "version '7' is not loaded" in r.json()["error"]["message"]

        # the per-version evidence, on /metrics and in the rollout's status
        status = rollout(srv.url)
        assert status["evidence"]["candidate"]["version"] == "2"
        assert status["evidence"]["candidate"]["images"] >= versions["2"]
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'seednet_version_requests_total{name="tiny",traffic="live",version="2"}' in metrics
        assert "seednet_rollout_active 1.0" in metrics


# ------------------------------------------------------------------------------ shadow


def test_shadow_traffic_never_changes_a_response_and_measures_agreement(
    rollout_registry, tmp_path, test_images
):
    """Every answer under 100 % shadow is byte for byte the one without a rollout; the
    comparisons the service counts are the ones two models loaded here compute."""
    from service.dataplane.images import ImageLimits, preprocess
    from service.lifecycle.loading import load_backend

    root = copy_of(rollout_registry, tmp_path)
    images = test_images[::2]  # 100 images
    with serve(root) as srv:
        before = asyncio.run(send(srv.url, images, len(images), concurrency=1))
        r = start(srv.url, "2", [{"mode": "shadow", "percent": 100}], {"min_samples": 10**9})
        assert r.status_code == 200, r.text
        during = asyncio.run(send(srv.url, images, len(images), concurrency=1))
        wait_until(
            lambda: (
                (rollout(srv.url)["evidence"] or {}).get("shadow", {}).get("compared", 0)
                >= len(images)
            ),
            60,
            0.1,
            "every shadow run to be compared",
        )
        evidence = rollout(srv.url)["evidence"]
    assert [x[2] for x in during] == [x[2] for x in before]  # same bodies, version 1
    assert {version_of(x) for x in during} == {"1"}

    reg = Registry(root)
    limits = ImageLimits(max_bytes=10**7, max_pixels=10**8, max_request_pixels=10**8)
    pixels = np.stack([preprocess(data, limits).array for _, data in images])
    tops = {}
    for v in ("1", "2"):
        mv = reg.resolve("tiny", v)
        probs = load_backend(reg, mv, "torchscript", "cpu").run(pixels)["probabilities"]
        tops[v] = [mv.manifest.class_names[i] for i in probs.argmax(axis=1)]
    agreed = sum(a == b for a, b in zip(tops["1"], tops["2"], strict=True))
    shadow = evidence["shadow"]
    assert shadow["compared"] == len(images) and shadow["dropped"] == 0
    assert shadow["agreement"] == pytest.approx(agreed / len(images), abs=1e-4)
    pairs = Counter((a, b) for a, b in zip(tops["1"], tops["2"], strict=True) if a != b)
    top = {(d["stable"], d["candidate"]): d["count"] for d in shadow["disagreements"]}
    assert all(pairs[k] == n for k, n in top.items()) and len(top) == min(10, len(pairs))
    assert evidence["candidate"]["requests"] == len(images)  # shadow runs of tiny@2
    assert evidence["stable"]["requests"] == len(images)
