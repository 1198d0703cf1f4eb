"""The served graph and the one definition of input normalisation.

:class:`Normalize` is used by training, evaluation and the exported graph alike, so the
pixels a model was trained on and the pixels it is served cannot drift apart.
:class:`InferenceModel` is what gets exported: uint8 images in, probabilities and the
stacked attention out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from seednet.constants import CIFAR10_MEAN, CIFAR10_STD
from seednet.model import SeedNet, SeedNetConfig, build_model


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

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits, attentions = self.model(self.normalize(images))
        return torch.softmax(logits.float(), dim=1), torch.stack(attentions, dim=1).float()


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
) -> InferenceModel:
    """The served graph of a trained network, in eval mode on the CPU."""
    return InferenceModel(model_from_weights(config, weights), mean, std).eval()


def save_weights(model: SeedNet, path: Path) -> None:
    """fp32 safetensors with the architecture config in its metadata."""
    state = {
        k: v.detach().float().contiguous().cpu()
        if v.is_floating_point()
        else v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(path), metadata={"format": "pt", "arch_config": model.config.to_json()})
