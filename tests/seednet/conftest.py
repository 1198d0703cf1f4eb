"""Fixtures of the served-graph tests: tiny@1's graph with any calibration, and real test
images."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from registry import Registry
from seednet.graph import InferenceModel, inference_model
from training.data import load_split


@pytest.fixture(scope="module")
def tiny_graph(served_registry) -> Callable[..., InferenceModel]:
    """``tiny_graph(**calibration)``: the served graph of tiny@1's verified weights, with
    the keyword arguments of :func:`seednet.graph.inference_model` (temperature, curve)."""
    reg = Registry(served_registry)
    mv = reg.resolve("tiny", "1")
    config = mv.manifest.model.config
    weights = reg.open_verified(mv, "weights.safetensors")
    return lambda **calibration: inference_model(config, weights, **calibration)


@pytest.fixture(scope="module")
def images(cifar_dir) -> torch.Tensor:
    """64 real test images, uint8 [64, 3, 32, 32]."""
    return load_split(cifar_dir, "test", 7).images[:64]
