"""A temperature that depends on how sure the network is: ``confidence-temperature``.

Label smoothing (0.1 in the ``fast`` recipe) caps the network's confidence near 0.9: the
images it is sure of come out under-confident, while the ones it hesitates on are already
about right. One temperature cannot fix both; sharpening enough for the first makes the
second over-confident (docs/calibration.md). So each image gets its own temperature, a
function of its uncalibrated confidence ``c = max(softmax(z))``::

    T(c) = exp(log_t0 - sum_i slopes[i] * max(0, c - knots[i]))      slopes >= 0
    probabilities = softmax(z / T(c))

- ``T`` is one positive number per image, so the order of its logits (the top-1 class)
  never changes;
- with non-negative slopes ``T`` never increases with ``c``: a surer image is never
  sharpened less than a less sure one (below the first knot, every image gets
  ``exp(log_t0)``);
- it is fitted on held-out images by the log-loss of the winning probability against
  "the top-1 was right" (training.calibration.fit_confidence_temperature), the proper
  score for the confidence users read.

The same numbers are evaluated here in numpy (fitting, figures) and in the served graph
(:class:`ConfidenceTemperatureScaling`, float32), so they agree within float precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

METHOD = "confidence-temperature"


@dataclass(frozen=True)
class ConfidenceTemperature:
    """The fitted curve: ``log_t0`` and one non-negative slope per knot (knots ascending,
    in (0, 1))."""

    log_t0: float
    knots: tuple[float, ...]
    slopes: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.knots) != len(self.slopes) or not self.knots:
            raise ValueError("a confidence temperature needs as many slopes as knots (>= 1)")
        values = (self.log_t0, *self.knots, *self.slopes)
        if not all(isinstance(v, float) and np.isfinite(v) for v in values):
            raise ValueError("confidence temperature: every number must be a finite float")
        if any(s < 0 for s in self.slopes):
            raise ValueError("confidence temperature: slopes must be >= 0")
        if any(not 0 < k < 1 for k in self.knots) or list(self.knots) != sorted(self.knots):
            raise ValueError("confidence temperature: knots must be ascending, in (0, 1)")

    @classmethod
    def from_dict(cls, data: object) -> ConfidenceTemperature:
        if not isinstance(data, dict):
            raise ValueError("calibration.curve must be an object")
        try:
            return cls(
                log_t0=float(data["log_t0"]),
                knots=tuple(float(k) for k in data["knots"]),
                slopes=tuple(float(s) for s in data["slopes"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"calibration.curve: {e!r}") from None

    def to_dict(self) -> dict:
        return {"log_t0": self.log_t0, "knots": list(self.knots), "slopes": list(self.slopes)}

    def temperature(self, confidence: np.ndarray) -> np.ndarray:
        """``T(c)`` of each uncalibrated confidence (float64)."""
        c = np.asarray(confidence, np.float64)[:, None]
        k, s = np.asarray(self.knots)[None], np.asarray(self.slopes)[None]
        return np.exp(self.log_t0 - (np.maximum(c - k, 0.0) * s).sum(axis=1))

    def temperatures(self, logits: np.ndarray) -> np.ndarray:
        """Each image's temperature, from its logits ``[N, classes]``."""
        z = np.asarray(logits, np.float64)
        z = z - z.max(axis=1, keepdims=True)
        return self.temperature(1.0 / np.exp(z).sum(axis=1))  # max softmax

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """``softmax(z / T(c))`` in float64."""
        z = np.asarray(logits, np.float64) / self.temperatures(logits)[:, None]
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


class ConfidenceTemperatureScaling(nn.Module):
    """Logits in, ``z / T(c)`` out (float32): the graph form of :class:`ConfidenceTemperature`.

    Written with ops that export to plain ONNX (Softmax, ReduceMax, Sub, Relu, Mul,
    ReduceSum, Exp) and that int8 quantisation leaves in float (seednet.quantize)."""

    def __init__(self, curve: ConfidenceTemperature) -> None:
        super().__init__()
        self.curve = curve
        self.register_buffer(
            "knots", torch.tensor(curve.knots, dtype=torch.float32)[None], persistent=False
        )
        self.register_buffer(
            "slopes", torch.tensor(curve.slopes, dtype=torch.float32)[None], persistent=False
        )
        self.register_buffer(
            "log_t0", torch.tensor(curve.log_t0, dtype=torch.float32), persistent=False
        )

    def forward(self, logits: Tensor) -> Tensor:
        c = torch.softmax(logits, dim=1).amax(dim=1, keepdim=True)
        log_t = self.log_t0 - (torch.relu(c - self.knots) * self.slopes).sum(dim=1, keepdim=True)
        return logits * torch.exp(-log_t)
