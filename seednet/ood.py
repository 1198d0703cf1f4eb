"""The ``density+energy`` out-of-distribution score: logits and features, standardised.

The energy of the logits alone misses what the network never saw (uniform noise scored
like a CIFAR photo: AUROC 0.53-0.63), because nothing forces the logits to be small
there. The features do notice: a class-conditional Gaussian with one shared covariance
(Lee et al. 2018, "A Simple Unified Framework for Detecting Out-of-Distribution
Samples") fitted on the channel means of one stage's output (what the next stage's
attention reads) puts noise, flat colours and digits far from every class. The score
adds the two, each standardised on held-out in-distribution images, so neither
dominates by its units:

    density = -logsumexp_c(-|W (f - mu_c)|^2 / 2)     (the mixture's -log density + const)
    score   = (energy - energy_loc) / energy_scale + (density - density_loc) / density_scale

``W`` is the Cholesky factor of the shared precision (``W W^T = Sigma^-1``), so the
squared distance is a sum of squares (no cancellation in float32), and the graph stores
``means @ W``: one ``[N, C] x [C, C]`` product per batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

DENSITY_SCORE = "density+energy"
#: Tensors of the ``ood.safetensors`` version file; the scalars live in the manifest.
DENSITY_FILE = "ood.safetensors"
# Shrinkage of the covariance towards its mean variance: 384 channels from 5,000 images
# leave the smallest eigenvalues noisy; 1e-3 of the mean keeps the inverse stable.
SHRINKAGE = 1e-3


@dataclass(frozen=True)
class FeatureDensity:
    """What the ``density+energy`` score needs besides the network (see the module
    docstring): the stage whose channel means are the features, the class means and the
    whitening matrix (``ood.safetensors``), and the four standardising scalars."""

    stage: int
    means: np.ndarray  # [classes, C] float32, class means of the features
    whitening: np.ndarray  # [C, C] float32, W with W W^T = inverse shared covariance
    energy_loc: float
    energy_scale: float
    density_loc: float
    density_scale: float

    def density(self, features: np.ndarray) -> np.ndarray:
        """``-logsumexp_c(-d_c / 2)`` in float64 (what the graph computes in float32)."""
        w = self.whitening.astype(np.float64)
        y = np.asarray(features, np.float64) @ w
        m = self.means.astype(np.float64) @ w
        d = ((y[:, None, :] - m[None]) ** 2).sum(-1)
        h = -0.5 * d
        top = h.max(axis=1)
        return -(top + np.log(np.exp(h - top[:, None]).sum(axis=1)))

    def score(self, energy: np.ndarray, features: np.ndarray) -> np.ndarray:
        e = (np.asarray(energy, np.float64) - self.energy_loc) / self.energy_scale
        d = (self.density(features) - self.density_loc) / self.density_scale
        return e + d

    def scalars(self) -> dict:
        """The manifest's record (``ood.features``): all but the two arrays."""
        return {
            "stage": self.stage,
            "file": DENSITY_FILE,
            "energy_loc": self.energy_loc,
            "energy_scale": self.energy_scale,
            "density_loc": self.density_loc,
            "density_scale": self.density_scale,
        }

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        save_file(
            {
                "means": self.means.astype(np.float32),
                "whitening": self.whitening.astype(np.float32),
            },
            str(path),
            metadata={"seednet_ood": json.dumps(self.scalars(), sort_keys=True)},
        )

    @classmethod
    def load(cls, path: Path, scalars: dict) -> FeatureDensity:
        """From the version file and the manifest's ``ood.features``."""
        from safetensors.numpy import load_file

        arrays = load_file(str(path))
        return cls(
            stage=int(scalars["stage"]),
            means=arrays["means"],
            whitening=arrays["whitening"],
            energy_loc=float(scalars["energy_loc"]),
            energy_scale=float(scalars["energy_scale"]),
            density_loc=float(scalars["density_loc"]),
            density_scale=float(scalars["density_scale"]),
        )


def fit_gaussians(
    features: np.ndarray, labels: np.ndarray, classes: int, shrinkage: float = SHRINKAGE
) -> tuple[np.ndarray, np.ndarray]:
    """(class means ``[classes, C]``, whitening ``W`` ``[C, C]``) of a class-conditional
    Gaussian with one shared covariance, fitted on ``features`` of images with ``labels``."""
    f = np.asarray(features, np.float64)
    y = np.asarray(labels)
    means = np.stack([f[y == c].mean(axis=0) for c in range(classes)])
    centred = f - means[y]
    cov = centred.T @ centred / len(f)
    cov += shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))
    whitening = np.linalg.cholesky(np.linalg.inv(cov))
    return means.astype(np.float32), whitening.astype(np.float32)


def standardise(values: np.ndarray) -> tuple[float, float]:
    """(median, standard deviation) of in-distribution scores: the loc and scale."""
    v = np.asarray(values, np.float64)
    scale = float(v.std())
    return float(np.median(v)), scale if scale > 0 else 1.0


class DensityScore(nn.Module):
    """The graph's half of the score: ``(energy, features) -> density+energy score``."""

    def __init__(self, density: FeatureDensity) -> None:
        super().__init__()
        w = torch.from_numpy(np.ascontiguousarray(density.whitening, dtype=np.float32))
        means = torch.from_numpy(np.ascontiguousarray(density.means, dtype=np.float32))
        self.register_buffer("whitening", w, persistent=False)
        self.register_buffer(
            "whitened_means", (means.double() @ w.double()).float(), persistent=False
        )
        self.energy_loc, self.energy_scale = density.energy_loc, density.energy_scale
        self.density_loc, self.density_scale = density.density_loc, density.density_scale

    def forward(self, energy: Tensor, features: Tensor) -> Tensor:
        y = features.float() @ self.whitening  # [N, C]
        diff = y.unsqueeze(1) - self.whitened_means.unsqueeze(0)  # [N, classes, C]
        d = (diff * diff).sum(dim=2)
        density = -torch.logsumexp(d * -0.5, dim=1)
        return (energy - self.energy_loc) / self.energy_scale + (
            density - self.density_loc
        ) / self.density_scale
