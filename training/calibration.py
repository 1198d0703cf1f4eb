"""Calibration and out-of-distribution figures from logits: fitting, scores, metrics.

Everything here works on numpy logits ``[N, classes]`` (float64 inside) and integer
labels; nothing reads images or models. The fitted numbers end up in a version's
manifest and, for the temperature, inside its served graph
(:class:`seednet.graph.CalibratedInferenceModel`).

Calibration methods compared (``training calibrate`` prints them side by side):

- :func:`fit_temperature`: one positive number T, ``softmax(z / T)`` (Guo et al. 2017,
  "On Calibration of Modern Neural Networks"). NLL is convex in 1/T, so the optimum is
  found by bisection on the derivative, to float precision, with no optimiser settings.
- :class:`VectorScaling`: a scale and a bias per class, ``softmax(w * z + b)``, fitted by
  L-BFGS on the NLL (the same paper's generalisation); 2 x classes parameters, and it
  can change the top-1 class.
- :class:`HistogramBinning`: the top-label confidence replaced by the accuracy of its
  confidence bin on the fitting images (Zadrozny & Elkan 2001, top-label form as in
  Gupta & Ramdas 2021); the other classes share the rest in proportion, so a winner
  lowered below the runner-up's share loses its place (the top-1 can change).

Metrics: :func:`ece` (equal-width confidence bins, 15 by default, the top-label ECE of
Guo et al.), :func:`nll`, :func:`brier` (sum over classes of the squared error against
the one-hot label, mean over images). OOD: :func:`energy_score` (Liu et al. 2020,
"Energy-based Out-of-distribution Detection") and :func:`max_softmax_score` (Hendrycks &
Gimpel 2017), both "higher = less like the training images"; :func:`auroc` and
:func:`fpr_at_tpr` with in-distribution images as the ones to keep.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from seednet.temperature import ConfidenceTemperature

ECE_BINS = 15
TARGET_KEPT = 0.95  # the share of in-distribution images an OOD threshold keeps
CURVE_KNOTS = 3  # seednet.temperature: the quartiles of the fitting images' confidence


# ----------------------------------------------------------------- probabilities
def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(logits, temperature))


def _labels(labels: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(labels, dtype=np.int64)
    if y.shape != (n,):
        raise ValueError(f"expected {n} labels, got shape {y.shape}")
    return y


# ----------------------------------------------------------------- metrics
def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped at 1e-12)."""
    p = np.asarray(probs, dtype=np.float64)
    y = _labels(labels, len(p))
    return float(-np.log(np.clip(p[np.arange(len(p)), y], 1e-12, 1.0)).mean())


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over images of the summed squared error against the one-hot label (0..2)."""
    p = np.asarray(probs, dtype=np.float64)
    y = _labels(labels, len(p))
    onehot = np.zeros_like(p)
    onehot[np.arange(len(p)), y] = 1.0
    return float(((p - onehot) ** 2).sum(axis=1).mean())


@dataclass(frozen=True)
class Reliability:
    """Per confidence bin: images, mean confidence and accuracy (NaN where empty)."""

    edges: np.ndarray  # [bins + 1], 0..1
    counts: np.ndarray  # [bins]
    confidence: np.ndarray  # [bins]
    accuracy: np.ndarray  # [bins]

    @property
    def ece(self) -> float:
        n = self.counts.sum()
        filled = self.counts > 0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float((self.counts[filled] * gaps).sum() / n) if n else 0.0


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """Top-label reliability: bin i holds confidences in (edges[i], edges[i+1]]
    (the first bin also holds exactly 0)."""
    p = np.asarray(probs, dtype=np.float64)
    y = _labels(labels, len(p))
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(index, weights=confidence, minlength=bins) / counts
        acc = np.bincount(index, weights=correct.astype(np.float64), minlength=bins) / counts
    return Reliability(edges, counts, conf, acc)


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over bins of |accuracy - confidence| x share."""
    return reliability(probs, labels, bins).ece


def summary(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, float]:
    """accuracy, mean confidence, ECE, NLL and Brier of one set of probabilities."""
    p = np.asarray(probs, dtype=np.float64)
    y = _labels(labels, len(p))
    return {
        "images": int(len(p)),
        "accuracy": float((p.argmax(axis=1) == y).mean()),
        "mean_confidence": float(p.max(axis=1).mean()),
        "ece": ece(p, y, bins),
        "nll": nll(p, y),
        "brier": brier(p, y),
    }


# ----------------------------------------------------------------- fitting
def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 that minimises the NLL of ``softmax(logits / T)``.

    With b = 1/T, NLL(b) = mean(logsumexp(b z) - b z_y) is convex; its derivative
    mean(E_softmax(bz)[z] - z_y) increases with b, so bisection on its sign (in log b,
    between 1e-3 and 1e3) finds the optimum. Logits that separate the classes perfectly
    have no finite optimum: the bound is returned then.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = _labels(labels, len(z))
    if len(z) == 0:
        raise ValueError("no images to fit a temperature on")
    z_true = z[np.arange(len(z)), y]

    def slope(log_b: float) -> float:
        p = softmax(z, 1.0 / np.exp(log_b))
        return float(((p * z).sum(axis=1) - z_true).mean())

    lo, hi = np.log(1e-3), np.log(1e3)
    if slope(hi) <= 0:
        return float(1.0 / np.exp(hi))
    if slope(lo) >= 0:
        return float(1.0 / np.exp(lo))
    for _ in range(100):  # 2^-100 of the interval: far below float precision
        mid = 0.5 * (lo + hi)
        if slope(mid) > 0:
            hi = mid
        else:
            lo = mid
    return float(1.0 / np.exp(0.5 * (lo + hi)))


class VectorScaling:
    """``softmax(w * z + b)``, one scale and bias per class, fitted by L-BFGS on the NLL."""

    def __init__(self) -> None:
        self.w: np.ndarray | None = None
        self.b: np.ndarray | None = None

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> VectorScaling:
        import torch

        z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
        y = torch.as_tensor(_labels(labels, len(z)))
        t0 = 1.0 / fit_temperature(logits, labels)  # start from temperature scaling
        w = torch.full((z.shape[1],), t0, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=500, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(z * w + b, y)
            loss.backward()
            return loss

        opt.step(closure)
        self.w, self.b = w.detach().numpy(), b.detach().numpy()
        return self

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        if self.w is None or self.b is None:
            raise RuntimeError("fit first")
        return softmax(np.asarray(logits, dtype=np.float64) * self.w + self.b)


def fit_confidence_temperature(
    logits: np.ndarray, labels: np.ndarray, knots: int = CURVE_KNOTS
) -> ConfidenceTemperature:
    """The :class:`~seednet.temperature.ConfidenceTemperature` of these held-out images.

    Knots at the ``knots`` interior quantiles of their uncalibrated confidence (the
    quartiles for 3), so they sit where the images are; ``log_t0`` and the slopes
    minimise the log-loss of the winning probability against "the top-1 is right" (the
    top-label calibration the ECE measures), by L-BFGS from temperature scaling's fit.
    Bounded (``|log_t0| <= 3``, slopes in (0, 50)) so that a set the network gets all
    right, or all wrong, still gives a finite curve.
    """
    import torch

    z64 = np.asarray(logits, dtype=np.float64)
    y = _labels(labels, len(z64))
    if len(z64) == 0:
        raise ValueError("no images to fit a confidence temperature on")
    confidence = softmax(z64).max(axis=1)
    qs = np.quantile(confidence, np.arange(1, knots + 1) / (knots + 1))
    k = tuple(float(np.clip(q, 1e-6, 1 - 1e-6)) for q in qs)
    right = torch.as_tensor(z64.argmax(axis=1) == y, dtype=torch.float64)
    z = torch.as_tensor(z64 - z64.max(axis=1, keepdims=True))  # winner at 0
    top = torch.as_tensor(z64.argmax(axis=1))
    others = torch.ones_like(z, dtype=torch.bool)
    others[torch.arange(len(z)), top] = False
    hinge = torch.relu(torch.as_tensor(confidence)[:, None] - torch.as_tensor(k)[None])
    t0 = fit_temperature(z64, y)
    u = torch.tensor(np.arctanh(np.clip(np.log(t0) / 3.0, -0.99, 0.99)), requires_grad=True)
    r = torch.full((knots,), -4.0, dtype=torch.float64, requires_grad=True)  # slopes ~0.9

    def loss() -> torch.Tensor:
        log_t = 3.0 * torch.tanh(u) - (hinge * 50.0 * torch.sigmoid(r)).sum(dim=1)
        zt = z * torch.exp(-log_t)[:, None]
        log_all = torch.logsumexp(zt, dim=1)  # log q = -log_all (the winner's logit is 0)
        log_rest = torch.logsumexp(zt.masked_fill(~others, -torch.inf), dim=1)
        return -(right * -log_all + (1 - right) * (log_rest - log_all)).mean()

    opt = torch.optim.LBFGS([u, r], lr=0.5, max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    opt.step(closure)
    return ConfidenceTemperature(
        log_t0=float(3.0 * np.tanh(u.item())),
        knots=k,
        slopes=tuple(float(50.0 / (1.0 + np.exp(-v))) for v in r.detach().numpy()),
    )


class HistogramBinning:
    """Top-label histogram binning: the winning class's probability becomes the accuracy
    of its confidence bin on the fitting images (equal-width bins; an empty bin keeps the
    bin's mean confidence); the other classes share the rest in proportion."""

    def __init__(self, bins: int = ECE_BINS) -> None:
        self.bins = bins
        self.values: np.ndarray | None = None

    def fit(self, probs: np.ndarray, labels: np.ndarray) -> HistogramBinning:
        r = reliability(probs, labels, self.bins)
        centres = 0.5 * (r.edges[:-1] + r.edges[1:])
        self.values = np.where(r.counts > 0, r.accuracy, centres)
        return self

    def probabilities(self, probs: np.ndarray) -> np.ndarray:
        if self.values is None:
            raise RuntimeError("fit first")
        p = np.asarray(probs, dtype=np.float64)
        top = p.argmax(axis=1)
        conf = p[np.arange(len(p)), top]
        edges = np.linspace(0.0, 1.0, self.bins + 1)
        index = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, self.bins - 1)
        # keep the winner the winner (at least 1/classes) and away from exactly 0 or 1
        new = np.clip(self.values[index], 1.0 / p.shape[1], 1.0 - 1e-6)
        rest = np.clip(1.0 - conf, 1e-12, None)
        out = p * ((1.0 - new) / rest)[:, None]
        out[np.arange(len(p)), top] = new
        return out


# ----------------------------------------------------------------- OOD scores
def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``-logsumexp(z / T)``: the free energy ``-T logsumexp(z / T)`` of the logits in
    units of T (the served graph's formula, :data:`seednet.graph.OOD_SCORES`); higher =
    less familiar. Dividing by T changes no order, so AUROC and FPR are the energy's."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    top = z.max(axis=1)
    return -(top + np.log(np.exp(z - top[:, None]).sum(axis=1)))


def max_softmax_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``-max softmax(z / T)``: minus the winning probability; higher = less confident."""
    return -softmax(logits, temperature).max(axis=1)


OOD_SCORE_FUNCTIONS = {"energy": energy_score, "max_softmax": max_softmax_score}


def ood_scores(method: str, logits: np.ndarray, temperature: float) -> np.ndarray:
    if method not in OOD_SCORE_FUNCTIONS:
        raise ValueError(f"unknown OOD score {method!r}; expected {sorted(OOD_SCORE_FUNCTIONS)}")
    return OOD_SCORE_FUNCTIONS[method](logits, temperature)


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve of telling OOD (positive) from in-distribution by the
    score: the chance that a random OOD image scores higher than a random in-distribution
    one, ties counting half (the Mann-Whitney U statistic, from average ranks)."""
    a = np.asarray(in_scores, dtype=np.float64)
    b = np.asarray(out_scores, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("AUROC needs images on both sides")
    both = np.concatenate([a, b])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both), dtype=np.float64)
    sorted_vals = both[order]
    # average ranks of ties (1-based)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_vals)) + 1]
    ends = np.r_[starts[1:], len(both)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = 0.5 * (s + e - 1) + 1.0
    u = ranks[len(a) :].sum() - len(b) * (len(b) + 1) / 2.0
    return float(u / (len(a) * len(b)))


def threshold_for_kept(in_scores: np.ndarray, kept: float = TARGET_KEPT) -> float:
    """The lowest threshold under which at least ``kept`` of ``in_scores`` fall (an image
    is flagged when its score is *above* the threshold)."""
    if not 0 < kept <= 1:
        raise ValueError("kept must be in (0, 1]")
    s = np.sort(np.asarray(in_scores, dtype=np.float64))
    if len(s) == 0:
        raise ValueError("no in-distribution scores")
    return float(s[int(np.ceil(kept * len(s))) - 1])


def fpr_at_tpr(in_scores: np.ndarray, out_scores: np.ndarray, tpr: float = TARGET_KEPT) -> float:
    """The share of OOD images *not* flagged at the threshold that keeps ``tpr`` of the
    in-distribution images (FPR at 95 % TPR in the OOD literature; lower is better)."""
    threshold = threshold_for_kept(in_scores, tpr)
    return float((np.asarray(out_scores) <= threshold).mean())


def flagged(scores: np.ndarray, threshold: float) -> float:
    """Share of images whose score is above ``threshold`` (the served flag's rule)."""
    return float((np.asarray(scores) > threshold).mean())
