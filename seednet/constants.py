"""CIFAR-10 facts every layer shares (class order, normalisation, input size)."""

from __future__ import annotations

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# Per-channel mean/std of the CIFAR-10 training set (pixels scaled to 0..1).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
INPUT_SIZE = 32  # the network sees INPUT_SIZE x INPUT_SIZE RGB images
