"""Device selection, one rule for training, evaluation, benchmarks and serving."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """The requested device does not exist on this machine (or is not a device name)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the GPU when there is one, else the CPU; ``cuda`` fails without one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' was asked for but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise DeviceError(f"unknown device {name!r}; expected auto, cpu or cuda")
    return torch.device(name)
