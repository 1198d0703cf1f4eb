"""A temperature per image from its confidence (seednet.temperature): fitted on held-out
logits, evaluated the same in numpy and in every export, never moving a top-1 class."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from registry.manifest import Calibration
from seednet.explain import Explainer
from seednet.export import (
    ExportError,
    check_metadata,
    eager_outputs,
    export_and_check,
    export_metadata,
    set_onnx_metadata,
)
from seednet.graph import CalibratedInferenceModel
from seednet.quantize import float_tail
from seednet.runtimes import OpenVinoModel, openvino_available, ort_outputs, ort_session
from seednet.temperature import ConfidenceTemperature
from training import calibration as cal

# T = 0.9 below confidence 0.3, then sharper: 0.9 * exp(-2 (c - 0.3) - 3 (c - 0.6)) above
CURVE = ConfidenceTemperature(log_t0=float(np.log(0.9)), knots=(0.3, 0.6), slopes=(2.0, 3.0))


@pytest.fixture(scope="module")
def tiny(tiny_graph):
    return tiny_graph(), tiny_graph(temperature=0.8, curve=CURVE)


def _logits(graph, images) -> np.ndarray:
    with torch.no_grad():
        logits, _ = graph.model(graph.normalize(images))
    return logits.numpy().astype(np.float64)


def test_the_curve_is_the_same_in_numpy_and_in_the_graph(tiny, images):
    plain, curved = tiny
    assert isinstance(curved, CalibratedInferenceModel)
    z = _logits(plain, images)
    with torch.no_grad():
        p0, a0 = plain(images)
        p1, a1, score = curved(images)
    expected = CURVE.probabilities(z)
    assert np.abs(p1.numpy() - expected).max() <= 1e-5
    assert torch.equal(p0.argmax(1), p1.argmax(1))  # never a moved top-1
    assert (p1 - p0).abs().max() > 1e-3
    # the OOD score keeps the one temperature: the curve does not move it
    assert np.abs(score.numpy() + np.log(np.exp(z / 0.8).sum(1))).max() <= 1e-4
    assert torch.equal(a0, a1)
    # surer images never get a higher temperature
    t = CURVE.temperatures(z)
    c = cal.softmax(z).max(1)
    order = np.argsort(c)
    assert np.all(np.diff(t[order]) <= 1e-12)
    assert t.max() <= 0.9 + 1e-12


def test_curves_that_would_break_the_guarantees_are_refused():
    for bad in (
        {"log_t0": 0.0, "knots": [0.5], "slopes": [-1.0]},  # sharpens less when surer
        {"log_t0": 0.0, "knots": [0.7, 0.4], "slopes": [1.0, 1.0]},
        {"log_t0": 0.0, "knots": [1.2], "slopes": [1.0]},
        {"log_t0": float("nan"), "knots": [0.5], "slopes": [1.0]},
        {"log_t0": 0.0, "knots": [0.5, 0.6], "slopes": [1.0]},
        {"log_t0": 0.0, "knots": [], "slopes": []},
        {"knots": [0.5], "slopes": [1.0]},
    ):
        with pytest.raises(ValueError, match="curve|confidence temperature"):
            ConfidenceTemperature.from_dict(bad)
    assert ConfidenceTemperature.from_dict(CURVE.to_dict()) == CURVE


def test_the_manifest_section_round_trips_with_and_without_a_curve():
    base = {"method": "temperature", "temperature": 0.77}
    assert "curve" not in Calibration.from_dict(base).__dict__ or (
        Calibration.from_dict(base).curve is None
    )
    with_curve = Calibration.from_dict(
        base | {"method": "confidence-temperature", "curve": CURVE.to_dict()}
    )
    assert ConfidenceTemperature.from_dict(with_curve.curve) == CURVE
    with pytest.raises(ValueError, match="curve"):
        Calibration.from_dict(base | {"curve": {"knots": 0.5}})


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a network under-confident on its easy images and about right on its hard
    ones (what label smoothing leaves): one temperature cannot calibrate both."""
    rng = np.random.default_rng(seed)
    easy = rng.random(n) < 0.8
    gap = np.where(easy, rng.uniform(3.9, 4.1, n), rng.uniform(0.0, 2.5, n))
    z = rng.normal(0.0, 0.1, (n, 10))
    winner = rng.integers(0, 10, n)
    z[np.arange(n), winner] += gap
    p = cal.softmax(z).max(1)  # easy: about 0.85
    # easy: right 99 % of the time whatever the softmax says; hard: right as often as it says
    right = np.where(easy, rng.random(n) < 0.99, rng.random(n) < p)
    wrong = (winner + rng.integers(1, 10, n)) % 10
    return z, np.where(right, winner, wrong)


def test_the_fit_beats_one_temperature_where_one_cannot_fit_and_moves_no_label():
    fz, fy = _synthetic(4000, 0)
    ez, ey = _synthetic(4000, 1)
    curve = cal.fit_confidence_temperature(fz, fy)
    t = cal.fit_temperature(fz, fy)
    q = curve.probabilities(ez)
    assert np.array_equal(q.argmax(1), ez.argmax(1))
    assert all(s >= 0 for s in curve.slopes) and len(curve.knots) == cal.CURVE_KNOTS
    one = cal.ece(cal.softmax(ez, t), ey)
    assert cal.ece(q, ey) < 0.8 * one, (cal.ece(q, ey), one)  # measured: 2.2 % vs 3.5 %
    assert cal.nll(q, ey) < cal.nll(cal.softmax(ez, t), ey)


def test_the_fit_stays_finite_when_every_label_is_right_or_wrong():
    z, _ = _synthetic(200, 2)
    for labels in (z.argmax(1), (z.argmax(1) + 1) % 10):
        curve = cal.fit_confidence_temperature(z, labels)
        q = curve.probabilities(z)
        assert np.isfinite(q).all() and np.array_equal(q.argmax(1), z.argmax(1))


def test_the_explainer_returns_the_served_probabilities(tiny, images):
    _, curved = tiny
    with torch.no_grad():
        served, _, _ = curved(images[:4])
    result = Explainer(curved).explain(images[:4])
    assert np.abs(np.asarray(result["probabilities"]) - served.numpy()).max() <= 1e-6
    with pytest.raises(ValueError, match="its own temperature"):
        Explainer(curved, temperature=2.0)


@pytest.mark.slow
def test_every_export_computes_the_curve_and_records_it(tiny, images, tmp_path):
    _, curved = tiny
    report = export_and_check(curved, images, tmp_path)
    assert report.passed
    assert report.metadata["confidence_temperature"] == CURVE.to_dict()
    for name in ("model.ts", "model.onnx"):
        assert export_metadata(tmp_path / name)["confidence_temperature"] == CURVE.to_dict()
    reference = eager_outputs(curved, images)
    got = ort_outputs(ort_session(tmp_path / "model.onnx"), images.numpy())
    assert np.abs(got["probabilities"] - reference["probabilities"]).max() <= 1e-5
    if openvino_available():
        ov = OpenVinoModel(tmp_path / "model.onnx").run_all(images.numpy())
        assert np.abs(ov["probabilities"] - reference["probabilities"]).max() <= 1e-5
    # int8 leaves the curve in float: every node between the logits and the probabilities
    model = onnx.load(str(tmp_path / "model.onnx"))
    kept = set(float_tail(model))
    curve_ops = {n.name for n in model.graph.node if n.op_type in ("Relu", "Exp", "ReduceSum")}
    tail = {n for n in curve_ops if n in kept}
    assert tail and {n.op_type for n in model.graph.node if n.name in tail} >= {"Relu", "Exp"}
    # an export with another curve is caught
    other = CURVE.to_dict() | {"slopes": [2.0, 3.5]}
    meta = export_metadata(tmp_path / "model.onnx")
    set_onnx_metadata(tmp_path / "model.onnx", json.dumps(meta | {"confidence_temperature": other}))
    with pytest.raises(ExportError, match="3.5"):
        check_metadata(tmp_path / "model.onnx", meta)
