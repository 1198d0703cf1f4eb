"""Where SeedNet looks: Grad-CAM per block and per-branch maps, for any class.

For a batch of uint8 images and a class (the predicted one unless asked for another),
:class:`Explainer` returns 32x32 maps in ``[0, 1]``:

- ``gradcam``: Grad-CAM (Selvaraju et al., 2017) at the output of each intermediate
  block, and ``macro_gradcam`` at the output of each residual macro block (after the
  shortcut and the pooling): ``ReLU(sum_c mean_hw(d score / d A_c) * A_c)``, the class
  score being the logit (so a temperature added to the served probabilities changes
  nothing here).
- ``branch_gradcam`` (per branch l of each block): the same Grad-CAM restricted to the
  branch's attention-weighted output ``z_l = a_l * branch_l(x)``. The block output is
  ``sum_l z_l`` and the attention ``a`` is computed from the block's input, so
  ``d score / d z_l`` is the block's gradient for every branch: the branches' maps before
  the ReLU add up exactly to the block's Grad-CAM. Each branch gets its part of the
  block's class evidence, in the block's own units.
- ``branch_strength`` (per branch): the L2 norm over channels of ``z_l``, where the
  branch's weighted output is large whatever the class (the same for every target).

Branch maps of one block are scaled together (the block's largest value becomes 1), so
a weak branch looks weak; ``branch_*_share`` gives each branch's raw part of the block's
total (summed over pixels, at the layer's resolution; shares of a block sum to 1; a block
with no positive evidence for the class gets equal shares). Every other map is scaled
on its own by its maximum; a map with no positive value stays all zeros.

Coarse maps (16x16 down to 4x4) are upsampled bilinearly to 32x32 after the ReLU, the
usual order for Grad-CAM. All maps of a call come from one forward and one backward
pass: Captum's layer-gradient machinery (what its ``LayerGradCam`` runs on) hooks every
branch and macro-block output at once, where ``LayerGradCam`` takes one layer per pass;
tests prove the maps equal ``LayerGradCam``'s, layer by layer.
How faithful each map is, measured: docs/explanations.md.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seednet.constants import CIFAR10_MEAN, CIFAR10_STD, INPUT_SIZE
from seednet.graph import CalibratedInferenceModel, InferenceModel, inference_model
from seednet.model import IntermediateBlock, PlainStage, ResidualMacroBlock

# Images explained per pass: bounds the activations and gradients held at once
# (about 25 MB for seednet at 16 images) without changing any result.
CHUNK = 16

OUTPUT_NAMES = (
    "logits",
    "probabilities",
    "target",
    "attention",
    "blocks",
    "gradcam",
    "branch_gradcam",
    "branch_gradcam_share",
    "branch_strength",
    "branch_strength_share",
    "macro_blocks",
    "macro_gradcam",
)


def _blocks_and_macros(model: InferenceModel) -> tuple[list[IntermediateBlock], list[tuple]]:
    """Intermediate blocks in network order; (pool module, first, last block number) per
    residual macro block (the pool's output is the macro block's output)."""
    blocks: list[IntermediateBlock] = []
    macros: list[tuple[nn.Module, int, int]] = []
    for stage in model.model.stages:
        if isinstance(stage, PlainStage):
            blocks.append(stage.block)
        elif isinstance(stage, ResidualMacroBlock):
            first = len(blocks) + 1
            blocks.extend(stage.blocks)
            macros.append((stage.pool, first, len(blocks)))
        else:  # pragma: no cover - SeedNet builds only these two
            raise TypeError(f"unknown stage {type(stage).__name__}")
    return blocks, macros


def _upsample(maps: Tensor) -> Tensor:
    """``[N, C, h, w]`` -> ``[N, C, 32, 32]``, bilinear (Captum's layer-to-input helper)."""
    from captum.attr import LayerAttribution

    if maps.shape[-2:] == (INPUT_SIZE, INPUT_SIZE):
        return maps
    return LayerAttribution.interpolate(maps, (INPUT_SIZE, INPUT_SIZE), "bilinear")


def _scale(maps: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Divide by the maximum over ``dims`` (maps are >= 0); all-zero maps stay zero."""
    peak = maps.amax(dim=dims, keepdim=True)
    return torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny), maps)


def _shares(per_branch: Tensor) -> Tensor:
    """``[N, L, h, w]`` (>= 0) -> ``[N, L]``: each branch's part of the sum; equal if none."""
    totals = per_branch.sum(dim=(2, 3))
    whole = totals.sum(dim=1, keepdim=True)
    equal = torch.full_like(totals, 1.0 / totals.shape[1])
    return torch.where(whole > 0, totals / whole.clamp_min(torch.finfo(totals.dtype).tiny), equal)


class Explainer:
    """Explains a trained SeedNet's predictions (eager model, gradients on).

    ``explain`` is deterministic (the same images and arguments give the same maps) and
    serialises its callers with a lock: the layer hooks live on the model during a call.
    The explainer holds its own copy of the model, so the caller's model is untouched.
    """

    def __init__(
        self,
        model: InferenceModel,
        *,
        device: str | torch.device = "cpu",
        temperature: float = 1.0,
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if isinstance(model, CalibratedInferenceModel) and temperature != 1.0:
            raise ValueError("a calibrated graph carries its own temperature")
        self.device = torch.device(device)
        self.model = copy.deepcopy(model).to(self.device).eval()
        # Gradients are needed with respect to layer outputs only, never the weights.
        self.model.requires_grad_(False)
        self.temperature = float(temperature)
        self._blocks, self._macros = _blocks_and_macros(self.model)
        self.num_blocks = len(self._blocks)
        self.num_branches = len(self._blocks[0].branches)
        self.num_classes = self.model.model.config.num_classes
        self._lock = threading.Lock()

    def _probabilities(self, logits: Tensor) -> Tensor:
        """The served graph's probabilities: a calibrated graph's own calibration (its
        temperature, or one per image), else ``softmax(logits / temperature)``."""
        if isinstance(self.model, CalibratedInferenceModel):
            return self.model.probabilities(logits, logits * self.model.scale)
        return torch.softmax(logits / self.temperature, dim=1)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_weights(
        cls,
        config: dict,
        weights: Path,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        **kwargs,
    ) -> Explainer:
        """From an architecture config and a safetensors file (as ``inference_model``)."""
        return cls(inference_model(config, weights, mean, std), **kwargs)

    @classmethod
    def from_registry(cls, registry, version, **kwargs) -> Explainer:
        """From a registry version's weights, checked against their sha256 first."""
        from seednet.export import served_graph

        return cls(served_graph(registry, version), **kwargs)

    # ------------------------------------------------------------------ validation
    def check_blocks(self, blocks: Sequence[int] | None) -> list[int]:
        """Block numbers (1-based, network order, as in the ``attention`` output) ->
        sorted unique list; ``None`` -> every block. ValueError for anything else."""
        if blocks is None:
            return list(range(1, self.num_blocks + 1))
        if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence):
            raise ValueError(f"blocks must be a list of block numbers, got {blocks!r}")
        if len(blocks) == 0:
            raise ValueError("blocks is empty: name at least one block, or pass None for all")
        chosen = set()
        for b in blocks:
            if isinstance(b, (bool, np.bool_)) or not isinstance(b, (int, np.integer)):
                raise ValueError(f"block numbers are integers, got {b!r}")
            if not 1 <= b <= self.num_blocks:
                raise ValueError(
                    f"block {b} is out of range: this model has blocks 1 to {self.num_blocks}"
                )
            chosen.add(int(b))
        return sorted(chosen)

    def _check_images(self, images) -> Tensor:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not isinstance(images, Tensor):
            raise ValueError(f"images must be a numpy array or a tensor, got {type(images)}")
        expected = (3, INPUT_SIZE, INPUT_SIZE)
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        if images.dim() != 4 or tuple(images.shape[1:]) != expected or images.shape[0] < 1:
            raise ValueError(
                f"images must have shape [N, 3, {INPUT_SIZE}, {INPUT_SIZE}] with N >= 1, "
                f"got {list(images.shape)}"
            )
        return images

    def _check_target(self, target, n: int) -> Tensor | None:
        if target is None:
            return None
        if isinstance(target, (int, np.integer)) and not isinstance(target, (bool, np.bool_)):
            values = [target] * n
        elif isinstance(target, (Sequence, np.ndarray, Tensor)) and not isinstance(
            target, (str, bytes)
        ):
            values = np.asarray(target).ravel().tolist() if not isinstance(target, list) else target
        else:
            raise ValueError(f"target must be a class index or one per image, got {target!r}")
        if len(values) != n:
            raise ValueError(f"target has {len(values)} entries for {n} images")
        for t in values:
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
                raise ValueError(f"target must be a class index, got {t!r}")
            if not 0 <= t < self.num_classes:
                raise ValueError(
                    f"target {t} is out of range: classes are 0 to {self.num_classes - 1}"
                )
        return torch.tensor([int(t) for t in values], dtype=torch.long)

    # ------------------------------------------------------------------ explaining
    def explain(
        self,
        images,
        target: int | Sequence[int] | None = None,
        blocks: Sequence[int] | None = None,
        *,
        macro: bool = True,
    ) -> dict[str, np.ndarray]:
        """Maps for ``images`` (uint8 ``[N, 3, 32, 32]``, RGB, numpy or torch).

        ``target``: a class index for every image, one per image, or ``None`` for each
        image's predicted class (the argmax of its logits). ``blocks``: block numbers
        (1 to ``num_blocks``), ``None`` for all. ``macro``: include the macro blocks'
        Grad-CAM. Returns numpy arrays (N images, B chosen blocks, L branches, M macro
        blocks, K classes):

        ========================= ======= ====================== =========================
        name                      dtype   shape                  meaning
        ========================= ======= ====================== =========================
        logits                    float32 [N, K]                 class scores
        probabilities             float32 [N, K]                 softmax(logits / T)
        target                    int64   [N]                    the class explained
        attention                 float32 [N, num_blocks, L]     every block's weights
        blocks                    int64   [B]                    chosen block numbers
        gradcam                   float32 [N, B, 32, 32]         in [0, 1]
        branch_gradcam            float32 [N, B, L, 32, 32]      in [0, 1], per block
        branch_gradcam_share      float32 [N, B, L]              sums to 1 per block
        branch_strength           float32 [N, B, L, 32, 32]      in [0, 1], per block
        branch_strength_share     float32 [N, B, L]              sums to 1 per block
        macro_blocks              int64   [M, 2]                 first and last block
        macro_gradcam             float32 [N, M, 32, 32]         in [0, 1]
        ========================= ======= ====================== =========================

        With ``macro=False`` M is 0. Raises ValueError for bad images, target or blocks.
        """
        x = self._check_images(images)
        chosen = self.check_blocks(blocks)
        targets = self._check_target(target, x.shape[0])
        macros = self._macros if macro else []
        with self._lock:
            parts = [
                self._explain_chunk(
                    x[i : i + CHUNK],
                    None if targets is None else targets[i : i + CHUNK],
                    chosen,
                    macros,
                )
                for i in range(0, x.shape[0], CHUNK)
            ]
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        out["blocks"] = np.asarray(chosen, dtype=np.int64)
        out["macro_blocks"] = np.asarray([[f, last] for _, f, last in macros], np.int64).reshape(
            -1, 2
        )
        return {k: out[k] for k in OUTPUT_NAMES}

    def _explain_chunk(
        self, images: Tensor, targets: Tensor | None, chosen: list[int], macros: list[tuple]
    ) -> dict[str, np.ndarray]:
        from captum._utils.gradient import compute_layer_gradients_and_eval

        n, nb, nl = images.shape[0], len(chosen), self.num_branches
        # Only single-tensor outputs are hooked: each branch (its output before the
        # attention weight) and each macro block's pool. A block's own output is the sum
        # of its weighted branches, so its Grad-CAM is the sum of theirs (see the module
        # docstring), and backward stops at the earliest chosen block.
        branches = [br for b in chosen for br in self._blocks[b - 1].branches]
        pools = [pool for pool, _, _ in macros]
        seen: dict[str, Tensor] = {}

        def class_scores(inputs: Tensor) -> Tensor:
            # One score per image, taken from this same pass: the predicted class needs
            # no extra forward pass.
            logits, attentions = self.model.model(inputs)
            seen["logits"] = logits.detach()
            seen["attention"] = torch.stack(attentions, 1).detach()
            seen["target"] = (logits.detach().argmax(1) if targets is None else targets).to(
                logits.device
            )
            return logits.gather(1, seen["target"].view(-1, 1)).squeeze(1)

        inputs = self.model.normalize(images.to(self.device))
        grads, evals = compute_layer_gradients_and_eval(class_scores, [*branches, *pools], inputs)
        with torch.no_grad():
            # Grad-CAM before the ReLU: channel weights = spatial mean of the gradient.
            cams = [
                (g[0].mean(dim=(2, 3), keepdim=True) * a[0]).sum(1, keepdim=True)
                for g, a in zip(grads, evals, strict=True)
            ]
            gradcam, b_maps, b_share, s_maps, s_share = [], [], [], [], []
            for i, number in enumerate(chosen):
                # A branch's output enters the block's sum weighted by its attention, so
                # the gradient with respect to it already carries that weight.
                branch_cams = torch.cat(cams[i * nl : (i + 1) * nl], 1)  # [N, L, h, w]
                weights = seen["attention"][:, number - 1]  # [N, L]
                weighted = [
                    weights[:, k].view(-1, 1, 1, 1) * evals[i * nl + k][0] for k in range(nl)
                ]
                strength = torch.cat([z.norm(dim=1, keepdim=True) for z in weighted], 1)
                block_cam = F.relu(branch_cams.sum(1, keepdim=True))
                gradcam.append(_scale(_upsample(block_cam), (1, 2, 3)))
                positive = F.relu(branch_cams)
                b_share.append(_shares(positive))
                s_share.append(_shares(strength))
                b_maps.append(_scale(_upsample(positive), (1, 2, 3)))
                s_maps.append(_scale(_upsample(strength), (1, 2, 3)))
            macro_gradcam = [_scale(_upsample(F.relu(c)), (1, 2, 3)) for c in cams[nb * nl :]]
            empty = torch.zeros(n, 0, INPUT_SIZE, INPUT_SIZE, device=inputs.device)
            logits = seen["logits"].float()
            result = {
                "logits": logits,
                "probabilities": self._probabilities(logits),
                "target": seen["target"],
                "attention": seen["attention"].float(),
                "gradcam": torch.cat(gradcam, 1),
                "branch_gradcam": torch.stack(b_maps, 1),
                "branch_gradcam_share": torch.stack(b_share, 1),
                "branch_strength": torch.stack(s_maps, 1),
                "branch_strength_share": torch.stack(s_share, 1),
                "macro_gradcam": torch.cat(macro_gradcam, 1) if macro_gradcam else empty,
            }
        return {
            k: v.cpu().numpy().astype(np.int64 if k == "target" else np.float32)
            for k, v in result.items()
        }


__all__ = ["CHUNK", "OUTPUT_NAMES", "Explainer"]
