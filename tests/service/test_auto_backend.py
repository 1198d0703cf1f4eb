"""SEEDNET_BACKEND=auto: the fastest verified fp32 backend, measured at load, never int8."""

from __future__ import annotations

import io
import json
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from registry import Registry
from service.config import Settings
from service.dataplane.backends import FP32_BACKENDS
from service.lifecycle import autoselect
from service.lifecycle.loading import load_backend, load_model
from service.lifecycle.prepare import prepare
from tests.conftest import LiveServer


@pytest.fixture
def registry_copy(served_registry, tmp_path) -> Registry:
    shutil.copytree(served_registry, tmp_path / "reg")
    return Registry(tmp_path / "reg")


def test_auto_is_the_default_backend(monkeypatch):
    monkeypatch.delenv("SEEDNET_BACKEND", raising=False)
    assert Settings().backend == "auto"


def test_auto_measures_every_verified_fp32_backend_and_answers_like_torchscript(
    registry_copy,
):
    mv = registry_copy.resolve("tiny", "1")
    autoselect._MEASURED.clear()
    prepared = prepare(registry_copy, mv, "auto", "cpu")
    names = [name for name, _ in prepared.candidates]
    assert names == autoselect.auto_candidates("cpu")
    assert "torchscript" in names and "onnx" in names and "onnx-int8" not in names
    model = load_model(prepared)
    auto = model.info["auto"]
    assert model.info["backend"] == auto["chosen"] in names
    assert set(auto["figures"]) == set(names) and auto["reused"] is False
    best = min(f["score_ms_per_image"] for f in auto["figures"].values())
    assert auto["figures"][auto["chosen"]]["score_ms_per_image"] == best
    golden = load_file(str(registry_copy.open_verified(mv, "golden.safetensors")))
    ts = load_backend(registry_copy, mv, "torchscript", "cpu")
    for batch in (1, 64):
        x = golden["images"][:batch]
        got, want = model.backend.run(x), ts.run(x)
        assert set(got) == set(want)
        for name in want:
            assert np.abs(got[name] - want[name]).max() <= 1e-4
    # a later load of the same network reuses the measurement instead of stalling batches
    again = load_model(prepare(registry_copy, registry_copy.resolve("tiny", "2"), "auto", "cpu"))
    assert again.info["auto"]["reused"] is True
    assert again.info["backend"] == auto["chosen"]


def test_auto_never_picks_an_unverified_backend(registry_copy):
    mv = registry_copy.resolve("tiny", "1")
    path = mv.path / "exports.json"
    info = json.loads(path.read_text())
    for check in info["checks"]:
        if check["artefact"] == "onnx":  # pretend the ONNX export failed its golden check
            check["max_abs_diff"]["probabilities"] = 0.5
    path.write_text(json.dumps(info))
    before = path.stat().st_mtime_ns
    prepared = prepare(registry_copy, mv, "auto", "cpu")
    assert "onnx" not in [name for name, _ in prepared.candidates]
    assert path.stat().st_mtime_ns == before  # a checked, failed export is not rebuilt each start
    autoselect._MEASURED.clear()
    assert load_model(prepared).info["backend"] in FP32_BACKENDS


@pytest.mark.slow
def test_auto_never_serves_int8_even_when_it_exists(registry_copy, cifar_dir):
    from seednet.quantize import quantize_version
    from training.data import load_split

    mv = registry_copy.resolve("tiny", "1")
    test = load_split(cifar_dir, "test", 5)
    calibration = load_split(cifar_dir, "train", 2).images.numpy()
    quantize_version(
        registry_copy, mv, calibration, test.images.numpy(), test.labels.numpy(),
        max_drop_points=100.0,
    )  # fmt: skip
    assert "model.int8.onnx" in registry_copy.derived(mv)["files"]
    autoselect._MEASURED.clear()
    prepared = prepare(registry_copy, mv, "auto", "cpu")
    assert "onnx-int8" not in [name for name, _ in prepared.candidates]
    model = load_model(prepared)
    assert model.info["backend"] != "onnx-int8"
    assert "onnx-int8" not in model.info["auto"]["figures"]


@pytest.mark.slow
def test_the_service_reports_which_backend_auto_chose(registry_copy):
    golden = load_file(str(registry_copy.root / "tiny" / "1" / "golden.safetensors"))
    autoselect._MEASURED.clear()
    with LiveServer(registry_root=registry_copy.root, model_name="tiny", device="cpu") as srv:
        assert srv.settings.backend == "auto"
        serving = httpx.get(f"{srv.url}/models").json()["serving"]
        assert serving["backend"] == serving["auto"]["chosen"]
        assert serving["backend"] in FP32_BACKENDS
        files = []
        for i in range(8):
            buf = io.BytesIO()
            Image.fromarray(golden["images"][i].transpose(1, 2, 0)).save(buf, "PNG")
            files.append(("files", (f"g{i}.png", buf.getvalue())))
        r = httpx.post(f"{srv.url}/predict", files=files, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"]["backend"] == serving["backend"]
        classes = list(Registry(registry_copy.root).resolve("tiny", "1").manifest.class_names)
        for i, p in enumerate(body["predictions"]):
            probs = np.array([p["probabilities"][c] for c in classes])
            assert np.abs(probs - golden["probabilities"][i]).max() <= 1e-4
