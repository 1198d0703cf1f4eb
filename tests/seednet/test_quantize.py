"""The int8 export: calibrated on training images, gated on test accuracy, served by name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from registry import Registry
from seednet.quantize import QuantizationRefused, quantize_version
from service.errors import ModelLoadError
from service.lifecycle.loading import load_backend
from service.lifecycle.prepare import prepare
from tests.conftest import REPO
from training.data import load_split


@pytest.fixture(scope="module")
def data(cifar_dir):
    calibration = load_split(cifar_dir, "train", 5).images.numpy()
    test = load_split(cifar_dir, "test", 20)
    return calibration, test.images.numpy(), test.labels.numpy()


@pytest.fixture
def registry_copy(served_registry, tmp_path) -> Registry:
    shutil.copytree(served_registry, tmp_path / "reg")
    return Registry(tmp_path / "reg")


@pytest.mark.slow
def test_int8_export_is_refused_below_the_threshold_with_both_figures(registry_copy, data):
    mv = registry_copy.resolve("tiny", "1")
    # Demand that int8 beat fp32 by 100 points: impossible, so the gate must refuse with
    # the real figures of both exports and write nothing.
    with pytest.raises(QuantizationRefused) as refused:
        quantize_version(registry_copy, mv, *data, max_drop_points=-100.0)
    message = str(refused.value)
    assert "int8 export refused" in message and "fp32" in message
    assert "200 images" in message and "limit -100.00" in message
    derived = registry_copy.derived(mv)
    assert "model.int8.onnx" not in derived["files"] and "int8" not in derived
    assert not (mv.path / "model.int8.onnx").exists()
    assert registry_copy.verify(mv) == []
    with pytest.raises(ModelLoadError, match="training quantize"):
        prepare(registry_copy, mv, "onnx-int8", "cpu")


@pytest.mark.slow
def test_accepted_int8_export_records_both_accuracies_and_serves_by_name(registry_copy, data):
    from seednet.quantize import accuracy
    from seednet.runtimes import ort_run, ort_session

    mv = registry_copy.resolve("tiny", "1")
    report = quantize_version(registry_copy, mv, *data, max_drop_points=100.0, data={"t": 1})
    derived = registry_copy.derived(mv)
    assert "model.int8.onnx" in derived["files"] and registry_copy.verify(mv) == []
    acc = derived["accuracy"]
    assert acc["onnx"]["accuracy"] == report.fp32_accuracy
    assert acc["onnx-int8"]["accuracy"] == report.int8_accuracy
    assert acc["onnx"]["test_images"] == acc["onnx-int8"]["test_images"] == 200
    assert derived["int8"]["calibration_images"] == 50
    assert derived["int8"]["format"] == "QDQ" and "per channel" in derived["int8"]["weights"]
    assert 0 <= derived["int8"]["golden"]["top1_agreement"] <= 1
    # the recorded figure is reproducible from the recorded file
    session = ort_session(registry_copy.open_verified(mv, "model.int8.onnx"))
    assert accuracy(lambda x: ort_run(session, x), data[1], data[2]) == report.int8_accuracy
    # the fp32 exports are untouched and still verified
    assert {"torchscript", "onnx"} <= set(derived["verified"])

    be = load_backend(registry_copy, mv, "onnx-int8", "cpu")
    assert be.name == "onnx-int8"
    out = be.run(data[1][:5])
    probs, att = out["probabilities"], out["attention"]
    assert probs.shape == (5, 10) and att.shape == (5, 7, 2)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)  # the softmax tail stays float
    assert np.allclose(att.sum(2), 1, atol=1e-5)


@pytest.mark.slow
def test_quantize_cli_refuses_with_the_figures(served_registry, cifar_dir, tmp_path):
    root = tmp_path / "reg"
    shutil.copytree(served_registry, root)
    r = subprocess.run(
        [
            sys.executable, "-m", "training", "quantize", "tiny@2", "--root", str(root),
            "--data", str(cifar_dir), "--calibration-per-class", "2",
            "--test-limit-per-class", "10", "--max-drop", "-100",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 1
    assert "int8 export refused" in r.stderr and "on 100 images" in r.stderr
    assert (
        "model.int8.onnx"
        not in json.loads((root / "tiny" / "2" / "exports.json").read_text())["files"]
    )
