"""Calibration and OOD figures from logits, against direct computations (no data needed)."""

from __future__ import annotations

import numpy as np
import pytest

from training import calibration as cal
from training.data import holdout_mask, within_class_index


def _sampled(n: int, temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits, and labels drawn from softmax(logits / temperature): calibrated at T."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, 10))
    p = cal.softmax(logits, temperature)
    labels = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return logits, labels


def test_fit_temperature_recovers_the_temperature_the_labels_were_drawn_at():
    for true_t in (0.5, 1.0, 2.5):
        logits, labels = _sampled(20000, true_t)
        assert cal.fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.05)


def test_fit_temperature_is_the_minimum_of_the_nll():
    logits, labels = _sampled(3000, 1.7, seed=1)
    t = cal.fit_temperature(logits, labels)
    grid = np.exp(np.linspace(np.log(0.2), np.log(10), 4001))
    nlls = [cal.nll(cal.softmax(logits, g), labels) for g in grid]
    assert t == pytest.approx(grid[int(np.argmin(nlls))], rel=2e-3)
    assert cal.nll(cal.softmax(logits, t), labels) <= min(nlls) + 1e-9


def test_ece_nll_brier_on_a_hand_computed_example():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    labels = np.array([0, 1, 1, 0])
    # bins of width 0.5: (0.5, 1] holds every top-label confidence 0.9, 0.6, 0.7, 0.8;
    # accuracy 3/4, mean confidence 0.75: ECE 0
    assert cal.ece(probs, labels, bins=2) == pytest.approx(0.0, abs=1e-12)
    # 10 bins: 0.9 (right), 0.6 (wrong), 0.7 (right), 0.8 (right), one per bin
    assert cal.ece(probs, labels, bins=10) == pytest.approx((0.1 + 0.6 + 0.3 + 0.2) / 4)
    assert cal.nll(probs, labels) == pytest.approx(
        -(np.log(0.9) + np.log(0.4) + np.log(0.7) + np.log(0.8)) / 4
    )
    assert cal.brier(probs, labels) == pytest.approx(
        (2 * 0.1**2 + 2 * 0.6**2 + 2 * 0.3**2 + 2 * 0.2**2) / 4
    )


def test_temperature_scaling_lowers_ece_and_nll_and_never_moves_the_top1():
    logits, labels = _sampled(20000, 0.6, seed=2)  # the raw logits are under-confident
    fit, held = slice(0, 10000), slice(10000, None)
    t = cal.fit_temperature(logits[fit], labels[fit])
    before, after = cal.softmax(logits[held]), cal.softmax(logits[held], t)
    assert cal.ece(after, labels[held]) < cal.ece(before, labels[held]) / 3
    assert cal.nll(after, labels[held]) < cal.nll(before, labels[held])
    assert np.array_equal(after.argmax(1), before.argmax(1))


def test_vector_scaling_and_histogram_binning_give_probability_vectors():
    logits, labels = _sampled(4000, 0.8, seed=3)
    vs = cal.VectorScaling().fit(logits, labels).probabilities(logits)
    hb = cal.HistogramBinning().fit(cal.softmax(logits), labels).probabilities(cal.softmax(logits))
    for p in (vs, hb):
        assert np.allclose(p.sum(1), 1) and (p >= 0).all()
    # binning sets the old winner's probability to its bin's accuracy on the fit images
    raw = cal.softmax(logits)
    top = raw.argmax(1)
    r = cal.reliability(raw, labels)
    bin_of = np.clip(np.searchsorted(r.edges, raw.max(1), side="left") - 1, 0, 14)
    expected = np.clip(r.accuracy[bin_of], 0.1, 1 - 1e-6)
    assert np.allclose(hb[np.arange(len(hb)), top], expected)


def test_auroc_equals_the_pairwise_count_with_ties_as_half():
    rng = np.random.default_rng(4)
    a = rng.integers(0, 20, 300).astype(float)
    b = rng.integers(5, 25, 200).astype(float)
    pairs = (b[None, :] > a[:, None]).mean() + 0.5 * (b[None, :] == a[:, None]).mean()
    assert cal.auroc(a, b) == pytest.approx(pairs)
    assert cal.auroc(np.zeros(5), np.ones(5)) == 1.0
    assert cal.auroc(np.ones(5), np.zeros(5)) == 0.0


def test_the_threshold_keeps_95_percent_and_fpr_counts_the_rest():
    scores = np.arange(1000, dtype=float)  # 0..999
    t = cal.threshold_for_kept(scores, 0.95)
    assert t == 949.0 and cal.flagged(scores, t) == 0.05
    ood = np.array([0.0, 500.0, 949.0, 950.0, 2000.0])
    # not flagged: scores <= 949 -> 3 of 5
    assert cal.fpr_at_tpr(scores, ood, 0.95) == pytest.approx(3 / 5)


def test_ood_scores_are_the_served_formulas():
    logits = np.array([[10.0, 0.0, 0.0], [1.0, 1.0, 1.0], [400.0, 399.0, -5.0]])
    t = 2.0
    direct = -np.log(np.exp((logits - logits.max(1, keepdims=True)) / t).sum(1)) - (
        logits.max(1) / t
    )
    assert np.allclose(cal.energy_score(logits, t), direct)
    assert np.isfinite(cal.energy_score(logits, t)).all()  # no overflow at 400
    assert np.allclose(cal.max_softmax_score(logits, t), -cal.softmax(logits, t).max(1))
    # the confident row scores lowest (most familiar) under both
    assert cal.energy_score(logits[:2], 1.0).argmin() == 0
    with pytest.raises(ValueError, match="unknown OOD score"):
        cal.ood_scores("mahalanobis", logits, 1.0)


def test_the_calibration_holdout_is_every_tenth_image_of_each_class():
    labels = np.repeat(np.arange(10), 5000)
    np.random.default_rng(5).shuffle(labels)  # classes interleaved, as in no real folder
    mask = holdout_mask(labels, 0.1)
    assert mask.sum() == 5000
    assert all(mask[labels == c].sum() == 500 for c in range(10))
    index = within_class_index(labels)
    assert set(index[mask] % 10) == {9}
    assert not holdout_mask(labels, 0.0).any()
    with pytest.raises(ValueError):
        holdout_mask(labels, 1.0)
