"""Rebuild a trained SeedNet from a run directory, a registry version or a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from registry import Registry
from registry.manifest import MANIFEST_FILE, WEIGHTS_FILE
from seednet.graph import model_from_weights
from seednet.model import SeedNet, SeedNetConfig, build_model


def load_model(source: Path) -> tuple[SeedNet, str]:
    """Accepts a run dir (model.safetensors), a registry version dir or a checkpoint.pt."""
    if source.is_file() and source.suffix == ".pt":
        ckpt = torch.load(source, map_location="cpu", weights_only=True)
        config = json.loads(ckpt["run_config"])["model_config"]
        model = build_model(SeedNetConfig.from_dict(config), init=False)
        model.load_state_dict(ckpt["model"])
        return model.eval(), f"checkpoint, epoch {ckpt['epoch']}"
    if (source / MANIFEST_FILE).exists():
        # a version folder: <root>/<name>/<version>; load it through the registry (verified)
        registry = Registry(source.parent.parent)
        mv = registry.resolve(source.parent.name, source.name)
        weights = registry.open_verified(mv, WEIGHTS_FILE)
        return model_from_weights(mv.manifest.model.config, weights), f"registry {mv.ref}"
    if (source / "model.safetensors").exists():
        config = json.loads((source / "config.json").read_text())["model_config"]
        return model_from_weights(config, source / "model.safetensors"), "run"
    raise ValueError(f"{source} is neither a run directory, a registry version nor a checkpoint")
