"""Rebuild a trained SeedNet from a run directory, a registry version or a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from training.model import SeedNet, SeedNetConfig, build_model


def model_from_weights(config: dict, weights: Path) -> SeedNet:
    """A model in eval mode from a config dict and a safetensors file (no pickle)."""
    model = build_model(SeedNetConfig.from_dict(config), init=False)
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


def load_model(source: Path) -> tuple[SeedNet, str]:
    """Accepts a run dir (model.safetensors), a registry version dir or a checkpoint.pt."""
    if source.is_file() and source.suffix == ".pt":
        ckpt = torch.load(source, map_location="cpu", weights_only=True)
        config = json.loads(ckpt["run_config"])["model_config"]
        model = build_model(SeedNetConfig.from_dict(config), init=False)
        model.load_state_dict(ckpt["model"])
        return model.eval(), f"checkpoint, epoch {ckpt['epoch']}"
    if (source / "manifest.json").exists():
        manifest = json.loads((source / "manifest.json").read_text())
        return (
            model_from_weights(manifest["model"]["config"], source / "weights.safetensors"),
            f"registry {manifest['name']}@{manifest['version']}",
        )
    if (source / "model.safetensors").exists():
        config = json.loads((source / "config.json").read_text())["model_config"]
        return model_from_weights(config, source / "model.safetensors"), "run"
    raise ValueError(f"{source} is neither a run directory, a registry version nor a checkpoint")
