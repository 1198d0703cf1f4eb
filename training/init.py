"""Training-time initialisation of a SeedNet (after the report's Kaiming init).

Nothing here changes the architecture: the same modules get other starting values.

- :func:`dirac_init_` adds an identity to every same-shape convolution (c_in = c_out,
  stride 1, "same" padding), so a block starts close to passing its input through
  (airbench's ``dirac_`` init). The Kaiming part stays, so the parallel branches of a
  block do not start identical.
- :func:`zero_init_attention_` zeroes each block's attention projection: every block
  starts as the plain mean of its L branches (softmax of zeros = 1/L).
- :func:`whitening_init_` sets the first block's branch filters from the eigenvectors of
  the training images' patch covariance, scaled by 1 / sqrt(eigenvalue + eps), in +/-
  pairs (airbench's whitening layer; there it is a separate frozen conv, here it is the
  first block's own convolutions). The first branch's outputs are uncorrelated on the
  training sample, with variance l / (l + eps) per eigenvalue l. Each later branch gets
  the same whitening turned by a random rotation within the chosen eigen-directions, so
  the branches differ: its outputs have the same spectrum (uncorrelated where l >> eps,
  which is nearly all of the variance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seednet.model import IntermediateBlock

WHITENING_EPS = 5e-4  # airbench's
WHITENING_IMAGES = 5000  # training images the patch covariance is estimated from


def _blocks(model: nn.Module) -> list[IntermediateBlock]:
    return [m for m in model.modules() if isinstance(m, IntermediateBlock)]


def _branch_convs(block: IntermediateBlock) -> list[nn.Conv2d]:
    return [branch[0] for branch in block.branches]


def same_shape(conv: nn.Conv2d) -> bool:
    """A conv whose output has its input's shape: c_in = c_out, stride 1, "same" padding."""
    k = conv.kernel_size
    return (
        conv.in_channels == conv.out_channels
        and conv.groups == 1
        and conv.stride == (1, 1)
        and all(kk % 2 == 1 for kk in k)
        and conv.padding == (k[0] // 2, k[1] // 2)
    )


@torch.no_grad()
def dirac_init_(model: nn.Module, scale: float = 1.0) -> int:
    """Add ``scale`` x identity to the branch convs of same shape; returns how many."""
    changed = 0
    for block in _blocks(model):
        for conv in _branch_convs(block):
            if same_shape(conv):
                identity = torch.zeros_like(conv.weight)
                nn.init.dirac_(identity)
                conv.weight.add_(identity, alpha=scale)
                changed += 1
    return changed


@torch.no_grad()
def zero_init_attention_(model: nn.Module) -> int:
    """Zero every attention projection (weights and bias); returns how many blocks."""
    blocks = _blocks(model)
    for block in blocks:
        nn.init.zeros_(block.attention.weight)
        nn.init.zeros_(block.attention.bias)
    return len(blocks)


@torch.no_grad()
def patch_covariance(images: Tensor, kernel: tuple[int, int], chunk: int = 500) -> Tensor:
    """Covariance (float64, centred) of every ``kernel``-sized patch of float ``images``.

    Patches are flattened in (channel, row, column) order, the order of a conv weight.
    """
    d = images.shape[1] * kernel[0] * kernel[1]
    total = torch.zeros(d, dtype=torch.float64, device=images.device)
    outer = torch.zeros(d, d, dtype=torch.float64, device=images.device)
    count = 0
    for start in range(0, len(images), chunk):
        cols = F.unfold(images[start : start + chunk].double(), kernel)  # [n, d, positions]
        x = cols.transpose(1, 2).reshape(-1, d)
        total += x.sum(0)
        outer += x.T @ x
        count += x.shape[0]
    mean = total / count
    return (outer - count * torch.outer(mean, mean)) / (count - 1)


def whitening_filters(cov: Tensor, eps: float = WHITENING_EPS) -> Tensor:
    """Rows W with W cov W^T = diag(l / (l + eps)): eigenvectors / sqrt(eigenvalue + eps),
    largest eigenvalue first. ``cov`` is d x d; the result is d x d (float64)."""
    values, vectors = torch.linalg.eigh(cov.double())  # ascending
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
    return vectors.T / torch.sqrt(values + eps)[:, None]


def _rotation(m: int, generator: torch.Generator) -> Tensor:
    """A random m x m orthogonal matrix (QR of a Gaussian, signs fixed: Haar-distributed)."""
    q, r = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


@torch.no_grad()
def whitening_init_(
    model: nn.Module,
    images: Tensor,
    generator: torch.Generator,
    eps: float = WHITENING_EPS,
) -> int:
    """Whiten the first block's branches from normalised float ``images``.

    Each branch of c_out filters gets m = min(d, c_out // 2) whitening directions (the
    top-m eigen-directions of the d = c_in x k x k patch covariance) as m filters and
    their m negatives (the ReLU after BN keeps one sign of each); any filters left keep
    their Kaiming values. Returns the number of filters set per branch.
    """
    block = _blocks(model)[0]
    convs = _branch_convs(block)
    conv = convs[0]
    if any(c.weight.shape != conv.weight.shape for c in convs):
        raise ValueError("whitening_init_ needs the first block's branches to share a shape")
    kernel = conv.kernel_size
    # the d x d eigenproblem and the rotations (CPU generator) on the CPU, whatever the
    # device of the images
    cov = patch_covariance(images, kernel).cpu()
    w = whitening_filters(cov, eps)
    d = w.shape[0]
    m = min(d, conv.out_channels // 2)
    top = w[:m]
    for b, c in enumerate(convs):
        rows = top if b == 0 else _rotation(m, generator) @ top
        filters = torch.cat([rows, -rows]).view(2 * m, conv.in_channels, *kernel)
        c.weight[: 2 * m] = filters.to(c.weight.dtype).to(c.weight.device)
    return 2 * m


def whitening_sample(images: Tensor, count: int = WHITENING_IMAGES) -> Tensor:
    """Up to ``count`` images spread over the set (a stride, so every class is in it)."""
    step = max(1, len(images) // count)
    return images[::step][:count]
