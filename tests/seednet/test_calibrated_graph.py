"""The calibrated served graph: temperature and OOD score inside every export."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from seednet.export import (
    ExportError,
    check_metadata,
    eager_outputs,
    export_and_check,
    export_metadata,
    set_onnx_metadata,
)
from seednet.graph import (
    CALIBRATED_OUTPUTS,
    CalibratedInferenceModel,
    out_of_distribution,
)
from seednet.runtimes import OpenVinoModel, openvino_available, ort_outputs, ort_session
from training.data import load_split


@pytest.fixture(scope="module")
def tiny_graphs(tiny_graph):
    return tiny_graph(), tiny_graph(temperature=0.37)


def test_temperature_changes_the_probabilities_but_never_the_top1(tiny_graphs, images):
    plain, calibrated = tiny_graphs
    assert isinstance(calibrated, CalibratedInferenceModel)
    with torch.no_grad():
        p0, a0 = plain(images)
        p1, a1, score = calibrated(images)
        logits, _ = plain.model(plain.normalize(images))
    assert torch.equal(p0.argmax(1), p1.argmax(1))
    assert (p1 - p0).abs().max() > 1e-3  # T = 0.37 sharpens visibly
    assert torch.allclose(p1, torch.softmax(logits / 0.37, 1), atol=1e-6)
    assert torch.allclose(score, -torch.logsumexp(logits / 0.37, 1), atol=1e-5)
    assert torch.equal(a0, a1)  # attention is the network's, untouched
    assert score.shape == (64,) and score.dtype == torch.float32


def test_bad_temperatures_and_scores_are_refused(tiny_graphs):
    model = tiny_graphs[0].model
    for t in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            CalibratedInferenceModel(model, t)
    with pytest.raises(ValueError, match="ood_score"):
        CalibratedInferenceModel(model, 1.0, "entropy")


@pytest.mark.slow
def test_every_export_returns_the_three_outputs_and_records_the_temperature(
    tiny_graphs, images, tmp_path
):
    calibrated = tiny_graphs[1]
    report = export_and_check(calibrated, images, tmp_path)
    assert report.passed
    expected = {"outputs": list(CALIBRATED_OUTPUTS), "temperature": 0.37, "ood_score": "energy"}
    assert report.metadata == expected
    for name in ("model.ts", "model.onnx"):
        assert export_metadata(tmp_path / name) == expected
    assert {tuple(c.max_abs_diff) for c in report.checks} == {CALIBRATED_OUTPUTS}
    assert report.to_info()["graph"]["outputs"]["ood_score"] == ["N"]
    reference = eager_outputs(calibrated, images)
    got = ort_outputs(ort_session(tmp_path / "model.onnx"), images.numpy())
    assert list(got) == list(CALIBRATED_OUTPUTS)
    if openvino_available():
        ov = OpenVinoModel(tmp_path / "model.onnx").run_all(images.numpy())
        assert np.abs(ov["ood_score"] - reference["ood_score"]).max() <= 1e-4
    # the temperature is also proven by the numbers: recover it from the export's
    # probabilities and the eager logits (log-ratios of two classes = logit gap / T)
    with torch.no_grad():
        logits, _ = calibrated.model(calibrated.normalize(images))
    z = logits.numpy().astype(np.float64)
    lp = np.log(got["probabilities"].astype(np.float64))
    i, j = z.argmax(1), z.argmin(1)
    rows = np.arange(len(z))
    recovered = (z[rows, i] - z[rows, j]) / (lp[rows, i] - lp[rows, j])
    assert np.median(recovered) == pytest.approx(0.37, rel=1e-3)


@pytest.mark.slow
def test_an_export_with_another_temperature_is_caught(tiny_graphs, images, tmp_path):
    calibrated = tiny_graphs[1]
    export_and_check(calibrated, images, tmp_path)
    onnx_path = tmp_path / "model.onnx"
    meta = export_metadata(onnx_path)
    set_onnx_metadata(onnx_path, json.dumps(meta | {"temperature": 0.38}))
    with pytest.raises(ExportError, match="0.38"):
        check_metadata(onnx_path, meta)
    shutil.copy(onnx_path, tmp_path / "copy.onnx")
    assert export_metadata(tmp_path / "copy.onnx")["temperature"] == 0.38


def test_the_flag_rule_is_strictly_above_the_threshold():
    scores = np.array([-3.0, -2.0, -1.999, 0.0], dtype=np.float32)
    assert out_of_distribution(scores, -2.0).tolist() == [False, False, True, True]


@pytest.fixture(scope="module")
def density_graph(tiny_graph, cifar_dir):
    """tiny@1 with the density+energy score, its Gaussians fitted on 20 training images
    per class and standardised on 10 test images per class (as `training calibrate` does)."""
    from seednet.graph import DensityCalibratedInferenceModel
    from training.calibrate import density_for

    calibrated = tiny_graph(temperature=0.8)
    net = calibrated.model
    stage = len(net.stages) - 2

    def outputs(x: torch.Tensor):
        with torch.no_grad():
            logits, _, means = net.forward_with_stage_means(calibrated.normalize(x))
        return logits.numpy(), means[stage].numpy()

    def named(x: torch.Tensor) -> dict:
        logits, feats = outputs(x)
        return {"logits": logits, f"stage{stage}": feats}

    train = load_split(cifar_dir, "train", 20)
    fit = load_split(cifar_dir, "test", 10)
    density = density_for(stage, 0.8, named(train.images), train.labels.numpy(), named(fit.images))
    return DensityCalibratedInferenceModel(net, 0.8, density).eval(), density, outputs


def test_the_density_score_in_the_graph_is_the_fitted_one(density_graph, images):
    """The graph's ood_score is energy + feature density, each standardised, as the numpy
    formula that fitted it; probabilities and attention are the temperature graph's."""
    graph, density, outputs = density_graph
    with torch.no_grad():
        probs, _, score = graph(images)
    logits, feats = outputs(images)
    energy = -torch.logsumexp(torch.from_numpy(logits) / 0.8, 1).numpy()
    expected = density.score(energy, feats)
    assert np.abs(score.numpy() - expected).max() < 1e-3 * max(1.0, np.abs(expected).max())
    assert torch.equal(probs.argmax(1), torch.from_numpy(logits).argmax(1))
    assert graph.metadata()["ood_score"] == "density+energy"
    assert graph.metadata()["ood_stage"] == density.stage
    # uniform noise is far from every class: it scores above the in-distribution images
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (32, 3, 32, 32), np.uint8))
    with torch.no_grad():
        _, _, noise_score = graph(noise)
    assert noise_score.median() > np.quantile(score.numpy(), 0.95)


def test_the_density_graph_exports_within_tolerance(density_graph, images, tmp_path):
    graph, _, _ = density_graph
    report = export_and_check(graph, images, tmp_path)
    assert report.passed
    for name in ("model.ts", "model.onnx"):
        assert export_metadata(tmp_path / name)["ood_score"] == "density+energy"


def test_the_whitening_is_the_inverse_shared_covariance():
    from seednet.ood import SHRINKAGE, fit_gaussians

    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 200)
    feats = rng.normal(size=(600, 4)) @ np.diag([1.0, 2.0, 0.5, 3.0]) + labels[:, None]
    means, w = fit_gaussians(feats, labels, 3)
    centred = feats - means[labels]
    cov = centred.T @ centred / len(feats)
    cov += SHRINKAGE * np.trace(cov) / 4 * np.eye(4)
    assert np.allclose(w @ w.T, np.linalg.inv(cov), rtol=1e-4, atol=1e-5)
    assert np.allclose(means, [feats[labels == c].mean(0) for c in range(3)], atol=1e-5)
