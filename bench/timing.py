"""Helpers shared by the benchmark scripts: a synchronised timer and the device's name."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import torch


def seconds_per_call(
    fn: Callable[[], object], iters: int, device: torch.device, warmup: int = 3
) -> float:
    """Mean wall time of ``fn()`` after ``warmup`` calls, waiting for the GPU to finish."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {torch.get_num_threads()} threads)"
