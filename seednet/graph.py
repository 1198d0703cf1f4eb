"""The served graph and the one definition of input normalisation.

:class:`Normalize` is used by training, evaluation and the exported graph alike, so the
pixels a model was trained on and the pixels it is served cannot drift apart.
:class:`InferenceModel` is what gets exported: uint8 images in, probabilities and the
stacked attention out. :class:`CalibratedInferenceModel` (versions with a ``calibration``
and an ``ood`` section in their manifest) also divides the logits by the fitted
temperature before the softmax (one number, or one per image from its confidence:
:mod:`seednet.temperature`) and returns a third output, ``ood_score``: like
normalisation, calibration lives inside the graph, so every backend and protocol returns
the same calibrated numbers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from seednet.constants import CIFAR10_MEAN, CIFAR10_STD
from seednet.model import SeedNet, SeedNetConfig, build_model
from seednet.ood import DENSITY_SCORE, DensityScore, FeatureDensity
from seednet.temperature import ConfidenceTemperature, ConfidenceTemperatureScaling

if TYPE_CHECKING:
    from registry.manifest import Manifest

OUTPUTS = ("probabilities", "attention")
CALIBRATED_OUTPUTS = (*OUTPUTS, "ood_score")
# How ``ood_score`` is computed from the logits z and the temperature T; in both, higher
# means "less like the images the model was trained on". "energy" is the free energy
# E = -T * logsumexp(z / T) of Liu et al. (2020) divided by T: the same order of images
# (so the same AUROC and the same flagged images at the matching threshold).
OOD_SCORES = {
    "energy": "-logsumexp(z / T)",
    "max_softmax": "-max(softmax(z / T))",
    DENSITY_SCORE: "standardised energy + standardised -log density of one stage's features "
    "under class-conditional Gaussians (seednet.ood)",
}
# Key of the metadata every export carries (ONNX metadata_props, a TorchScript extra file).
METADATA_KEY = "seednet"


class Normalize(nn.Module):
    """uint8 ``[N, 3, H, W]`` -> float32 ``(x / 255 - mean) / std``, per channel.

    Written as one multiply-add with folded constants (what the exports have always run).
    """

    def __init__(
        self, mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD
    ) -> None:
        super().__init__()
        m = torch.tensor(tuple(mean), dtype=torch.float32).view(1, 3, 1, 1)
        s = torch.tensor(tuple(std), dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * s), persistent=False)
        self.register_buffer("shift", m / s, persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return images.float() * self.scale - self.shift


class InferenceModel(nn.Module):
    """The served graph: uint8 images in, probabilities and stacked attention out.

    Normalisation lives inside the graph so no client can get it wrong. All blocks
    of the shipped architectures have the same number of branches L, so attention
    is one ``[N, blocks, L]`` tensor.
    """

    def __init__(
        self,
        model: SeedNet,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        if len(set(model.config.branches_per_block)) != 1:
            raise ValueError("InferenceModel needs the same number of branches in every block")
        self.normalize = Normalize(mean, std)
        self.model = model

    output_names: tuple[str, ...] = OUTPUTS

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits, attentions = self.model(self.normalize(images))
        return torch.softmax(logits.float(), dim=1), torch.stack(attentions, dim=1).float()

    def metadata(self) -> dict:
        """What every export of this graph records about itself (checked after export)."""
        return {"outputs": list(self.output_names), "temperature": None, "ood_score": None}


class CalibratedInferenceModel(InferenceModel):
    """The served graph of a calibrated version: three outputs.

    - ``probabilities`` ``[N, classes]``: ``softmax(logits / temperature)``, or with a
      ``curve`` ``softmax(logits / T(c))`` (:mod:`seednet.temperature`); dividing by one
      positive number per image never changes the order of its logits, so the top-1
      class is the uncalibrated model's;
    - ``attention`` ``[N, blocks, L]``: as :class:`InferenceModel`;
    - ``ood_score`` ``[N]`` fp32: :data:`OOD_SCORES` [``ood_score``], always with the
      one ``temperature`` (the score and its threshold do not depend on the curve).

    The temperature and the curve are constants of the graph (folded into every export),
    and the exports carry them in their metadata too, so they can be compared with the
    manifest's.
    """

    output_names = CALIBRATED_OUTPUTS

    def __init__(
        self,
        model: SeedNet,
        temperature: float,
        ood_score: str = "energy",
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        curve: ConfidenceTemperature | None = None,
    ) -> None:
        super().__init__(model, mean, std)
        if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if ood_score not in OOD_SCORES:
            raise ValueError(f"ood_score must be one of {sorted(OOD_SCORES)}, got {ood_score!r}")
        self.temperature = float(temperature)
        self.ood_score = ood_score
        self.energy = ood_score == "energy"
        self.register_buffer(
            "scale", torch.tensor(1.0 / self.temperature, dtype=torch.float32), persistent=False
        )
        self.curve = curve
        self.per_image = ConfidenceTemperatureScaling(curve) if curve is not None else None

    def probabilities(self, logits: Tensor, z: Tensor) -> Tensor:
        """The served probabilities from the logits (``z``: the logits / temperature)."""
        if self.per_image is not None:
            return torch.softmax(self.per_image(logits), dim=1)
        return torch.softmax(z, dim=1)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        logits, attentions = self.model(self.normalize(images))
        z = logits.float() * self.scale
        probs = self.probabilities(logits.float(), z)
        # energy: one ReduceLogSumExp then Neg in ONNX, stable in ONNX Runtime and OpenVINO
        # (checked with logits in the hundreds); ONNX Runtime's quantisation tools cannot
        # infer shapes past a hand-written max-subtract-exp, nor past a multiplication
        # after the ReduceLogSumExp, hence E / T and not E.
        if self.energy:
            score = -torch.logsumexp(z, dim=1)
        else:  # the score's softmax is at the one temperature, with or without a curve
            plain = probs if self.per_image is None else torch.softmax(z, dim=1)
            score = -plain.max(dim=1).values
        return probs, torch.stack(attentions, dim=1).float(), score

    def metadata(self) -> dict:
        meta = {
            "outputs": list(self.output_names),
            "temperature": self.temperature,
            "ood_score": self.ood_score,
        }
        if self.curve is not None:  # absent, not null, in the exports of earlier versions
            meta["confidence_temperature"] = self.curve.to_dict()
        return meta


class DensityCalibratedInferenceModel(CalibratedInferenceModel):
    """A calibrated graph whose ``ood_score`` is ``density+energy`` (:mod:`seednet.ood`):
    the energy of the logits and the density of one stage's channel means, each
    standardised; the density's constants are buffers of the graph like the temperature."""

    def __init__(
        self,
        model: SeedNet,
        temperature: float,
        density: FeatureDensity,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        curve: ConfidenceTemperature | None = None,
    ) -> None:
        super().__init__(model, temperature, "energy", mean, std, curve)
        if not 0 <= density.stage < len(model.stages):
            raise ValueError(f"ood stage {density.stage} is not a stage of this network")
        self.ood_score = DENSITY_SCORE
        self.stage = density.stage
        self.density = DensityScore(density)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        logits, attentions, means = self.model.forward_with_stage_means(self.normalize(images))
        z = logits.float() * self.scale
        probs = self.probabilities(logits.float(), z)
        energy = -torch.logsumexp(z, dim=1)
        score = self.density(energy, means[self.stage])
        return probs, torch.stack(attentions, dim=1).float(), score

    def metadata(self) -> dict:
        return super().metadata() | {"ood_stage": self.stage}


def metadata_json(graph: InferenceModel) -> str:
    """The export metadata of ``graph`` as stored in the files (one JSON object)."""
    return json.dumps(graph.metadata(), sort_keys=True)


def out_of_distribution(ood_score: np.ndarray, threshold: float) -> np.ndarray:
    """The ``out_of_distribution`` flag of each image: its score above the version's
    threshold (``manifest.ood.threshold``, chosen at publish to keep 95 % of held-out
    in-distribution test images). The one rule for every caller."""
    return np.asarray(ood_score) > threshold


def model_from_weights(config: dict, weights: Path) -> SeedNet:
    """A model in eval mode from a config dict and a safetensors file (no pickle)."""
    model = build_model(SeedNetConfig.from_dict(config), init=False)
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


def inference_model(
    config: dict,
    weights: Path,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    temperature: float | None = None,
    ood_score: str = "energy",
    density: FeatureDensity | None = None,
    curve: ConfidenceTemperature | None = None,
) -> InferenceModel:
    """The served graph of a trained network, in eval mode on the CPU; calibrated (three
    outputs) when a ``temperature`` is given, per image when also a ``curve``; with a
    ``density`` when the OOD score is ``density+energy``."""
    model = model_from_weights(config, weights)
    if temperature is None:
        return InferenceModel(model, mean, std).eval()
    if ood_score == DENSITY_SCORE:
        if density is None:
            raise ValueError(f"the {DENSITY_SCORE} OOD score needs its fitted density")
        return DensityCalibratedInferenceModel(model, temperature, density, mean, std, curve).eval()
    return CalibratedInferenceModel(model, temperature, ood_score, mean, std, curve).eval()


def version_graph(
    manifest: Manifest, weights: Path, density_file: Path | None = None
) -> InferenceModel:
    """The served graph a version's manifest describes (its files already verified):
    calibrated with the manifest's temperature and OOD score when it has them;
    ``density_file`` is the version's ``ood.safetensors`` when its score needs it."""
    calibration, ood = manifest.calibration, manifest.ood
    density = None
    if ood is not None and ood.score == DENSITY_SCORE:
        if density_file is None:
            raise ValueError(f"{ood.score}: the version's {ood.features.get('file')} is needed")
        density = FeatureDensity.load(density_file, ood.features)
    return inference_model(
        manifest.model.config,
        weights,
        manifest.normalization.mean,
        manifest.normalization.std,
        temperature=calibration.temperature if calibration is not None else None,
        ood_score=ood.score if ood is not None else "energy",
        density=density,
        curve=version_curve(manifest),
    )


def version_curve(manifest: Manifest) -> ConfidenceTemperature | None:
    """The version's confidence temperature (:mod:`seednet.temperature`), if it has one."""
    calibration = manifest.calibration
    if calibration is None or calibration.curve is None:
        return None
    return ConfidenceTemperature.from_dict(calibration.curve)


def density_file_name(manifest: Manifest) -> str | None:
    """The version file :func:`version_graph` needs besides the weights, if any."""
    ood = manifest.ood
    return ood.features.get("file") if ood is not None and ood.score == DENSITY_SCORE else None


def served_outputs(manifest: Manifest) -> tuple[str, ...]:
    """Names of the outputs every export of this version returns, in order."""
    return CALIBRATED_OUTPUTS if manifest.calibration is not None else OUTPUTS


def save_weights(model: SeedNet, path: Path) -> None:
    """fp32 safetensors with the architecture config in its metadata."""
    state = {
        k: v.detach().float().contiguous().cpu()
        if v.is_floating_point()
        else v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(path), metadata={"format": "pt", "arch_config": model.config.to_json()})
