"""`training calibrate` end to end on a tiny model in a temporary registry, and a run that
held out a calibration split published calibrated."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from registry import Registry
from registry.files import sha256_file
from registry.manifest import PUBLISHED_INT8_FILE
from seednet.export import check_version_metadata, export_metadata
from seednet.graph import CALIBRATED_OUTPUTS, out_of_distribution
from seednet.ood import DENSITY_FILE
from seednet.runtimes import ort_outputs, ort_session
from seednet.temperature import ConfidenceTemperature
from training.ood_sets import PROCEDURAL

# Two publishes with exports, int8 and a training run: minutes on a busy 2-core machine.
pytestmark = pytest.mark.timeout(2400)


@pytest.mark.slow
def test_calibrate_publishes_a_verified_child_with_its_figures(calibrated):
    registry, first, _ = calibrated
    assert first.returncode == 0, first.stderr
    assert "published tiny@3 (parent tiny@1)" in first.stdout
    for row in (
        "uncalibrated",
        "temperature",
        "confidence_temperature",
        "vector_scaling",
        "histogram_binning",
    ):
        assert row in first.stdout
    mv = registry.get("tiny@3")
    m = mv.manifest
    raw = json.loads((mv.path / "manifest.json").read_text())
    assert raw["schema_version"] == 3 and m.parent == "tiny@1"
    weights, parents = m.files["weights.safetensors"], registry.get("tiny@1").manifest.files
    # the same weights, stored once: the child's entry points at its parent's file
    assert (weights.sha256, weights.size) == (
        parents["weights.safetensors"].sha256,
        parents["weights.safetensors"].size,
    )
    assert weights.location == "1/weights.safetensors"
    assert not (mv.path / "weights.safetensors").exists()
    assert m.calibration.method == "confidence-temperature" and m.calibration.temperature > 0
    curve = ConfidenceTemperature.from_dict(m.calibration.curve)  # validated: slopes >= 0
    assert len(curve.knots) == 3 and raw["calibration"]["curve"] == curve.to_dict()
    assert m.calibration.fitted_on["half"] == "even" and m.calibration.evaluated_on["half"] == "odd"
    assert m.calibration.fitted_on["images"] == m.calibration.evaluated_on["images"] == 50
    for key in ("ece", "nll", "brier", "uncalibrated_ece", "uncalibrated_nll"):
        assert isinstance(getattr(m.metrics, key), float)
    assert m.metrics.ece_bins == 15 and m.metrics.calibration_eval_images == 50
    assert m.ood.score == "density+energy" and m.ood.target_kept == 0.95
    assert set(m.ood.sets) == set(PROCEDURAL)
    for figures in m.ood.sets.values():
        assert 0 <= figures["auroc"] <= 1 and figures["images"] == 40
    # the density's arrays: a checksummed version file; its scalars and stage in the manifest
    features = m.ood.features
    stages = len(m.model.config["stages"])
    assert features["file"] == DENSITY_FILE and features["stage"] == stages - 2
    assert features["energy_scale"] > 0 and features["density_scale"] > 0
    assert DENSITY_FILE in m.files and (mv.path / DENSITY_FILE).is_file()
    # every other score was measured beside it, on the same sets
    assert {"energy", "max_softmax", "density+energy@stage0"} <= set(m.ood.details["alternatives"])
    assert registry.verify(mv) == []
    path = mv.path / DENSITY_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    try:
        assert any(DENSITY_FILE in p for p in registry.verify(mv))
    finally:
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.slow
def test_the_temperature_of_the_manifest_is_in_every_export_and_the_graph(calibrated):
    registry, _, _ = calibrated
    mv = registry.get("tiny@3")
    t = mv.manifest.calibration.temperature
    curve = mv.manifest.calibration.curve
    assert check_version_metadata(registry, mv) == []
    exports = registry.derived(mv)
    assert {"torchscript", "onnx"} <= set(exports["verified"])
    assert exports["graph"]["metadata"]["temperature"] == t
    assert exports["graph"]["metadata"]["confidence_temperature"] == curve
    for name in ("model.ts", "model.onnx"):
        meta = export_metadata(mv.path / name)
        assert meta["temperature"] == t and meta["confidence_temperature"] == curve
    # the golden set of the child: calibrated eager outputs, the parent's images
    golden = load_file(str(mv.path / "golden.safetensors"))
    parent = load_file(str(registry.get("tiny@1").path / "golden.safetensors"))
    assert set(golden) == {"images", *CALIBRATED_OUTPUTS}
    assert np.array_equal(golden["images"], parent["images"])
    assert np.array_equal(golden["probabilities"].argmax(1), parent["probabilities"].argmax(1))
    assert np.abs(golden["probabilities"] - parent["probabilities"]).max() > 1e-4
    # the parent's probabilities are softmax(z): their logs are z up to a constant per
    # image, which the curve ignores; so the child's are the manifest's curve applied to them
    expected = ConfidenceTemperature.from_dict(curve).probabilities(
        np.log(parent["probabilities"].astype(np.float64))
    )
    assert np.abs(golden["probabilities"] - expected).max() <= 1e-5
    got = ort_outputs(ort_session(mv.path / "model.onnx"), golden["images"])
    assert np.abs(got["ood_score"] - golden["ood_score"]).max() <= 1e-4
    # the flag keeps most in-distribution images (the threshold keeps 95 % of the fit half)
    flags = out_of_distribution(golden["ood_score"], mv.manifest.ood.threshold)
    assert flags.mean() < 0.5


@pytest.mark.slow
def test_the_int8_export_is_a_published_file_gated_on_accuracy(calibrated):
    registry, _, _ = calibrated
    mv = registry.get("tiny@3")
    gate = mv.manifest.int8
    assert gate.passed and gate.file == PUBLISHED_INT8_FILE
    assert gate.test_images == 100 and gate.max_drop_points == 100
    entry = mv.manifest.files[PUBLISHED_INT8_FILE]
    assert entry.sha256 == sha256_file(mv.path / PUBLISHED_INT8_FILE)
    meta = export_metadata(mv.path / PUBLISHED_INT8_FILE)
    assert meta["temperature"] == mv.manifest.calibration.temperature
    assert meta["confidence_temperature"] == mv.manifest.calibration.curve
    out = ort_outputs(
        ort_session(mv.path / PUBLISHED_INT8_FILE), np.zeros((3, 3, 32, 32), np.uint8)
    )
    assert list(out) == list(CALIBRATED_OUTPUTS) and out["ood_score"].shape == (3,)
    # a flipped byte in the published int8 file fails verification
    path = mv.path / PUBLISHED_INT8_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    try:
        assert any(PUBLISHED_INT8_FILE in p for p in registry.verify(mv))
    finally:
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    assert registry.verify(mv) == []


@pytest.mark.slow
def test_a_retried_calibrate_returns_the_same_version(calibrated):
    registry, first, second = calibrated
    assert second.returncode == 0, second.stderr
    assert "already published tiny@3 (parent tiny@1)" in second.stdout
    assert [v.version for v in registry.versions("tiny")] == ["1", "2", "3"]


@pytest.mark.slow
def test_a_run_with_a_held_out_split_is_published_calibrated(cifar_dir, tmp_path):
    from training.calibrate import CalibrateSettings
    from training.publish import publish_run
    from training.train import TrainSettings, train

    out = tmp_path / "run"
    train(
        TrainSettings(
            recipe="seed",
            arch="seednet-small",
            data=str(cifar_dir),
            out=str(out),
            epochs=1,
            batch_size=32,
            device="cpu",
            limit_per_class=20,
            calibration_fraction=0.1,
            checkpoint=False,
            reports=False,
        )
    )
    config = json.loads((out / "config.json").read_text())
    held = config["dataset"]["calibration"]
    assert held["images"] == 20 and held["fraction"] == 0.1  # images 9 and 19 of each class
    assert config["dataset"]["train"]["count"] == 180
    settings = CalibrateSettings(
        ood_dir=None, cache_dir=None, test_limit_per_class=10, max_drop_points=100, corruptions=()
    )
    mv = publish_run(out, "held", tmp_path / "models", calibration=settings)
    m = mv.manifest
    assert m.calibration.fitted_on["split"].startswith("train, held out")
    assert m.calibration.fitted_on["images"] == 20
    assert m.calibration.evaluated_on["split"] == "test"
    assert m.dataset["calibration"]["rule"].startswith("within each class folder")
    registry = Registry(tmp_path / "models")
    assert registry.verify(mv) == [] and check_version_metadata(registry, mv) == []
