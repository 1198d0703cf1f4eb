"""`python -m training export RUN --out DIR`: a run's exports, proven on real test images."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from seednet.export import CHECK_BATCHES, ExportReport, export_and_check
from seednet.graph import inference_model
from training.data import load_split


def check_images_from(data: str, count: int = max(CHECK_BATCHES)) -> torch.Tensor:
    """Real test images spread over the classes (the first few of each)."""
    per_class = max(1, -(-count // 10))
    test = load_split(data, "test", per_class)
    order = torch.arange(len(test)).view(10, -1).t().reshape(-1)  # interleave classes
    return test.images[order][:count]


def run_graph(run_dir: Path):
    """The served graph of a finished run (eager, CPU)."""
    config = json.loads((run_dir / "config.json").read_text())
    norm = config["normalization"]
    return inference_model(
        config["model_config"], run_dir / "model.safetensors", norm["mean"], norm["std"]
    )


def export_run(run_dir: Path, out_dir: Path) -> ExportReport:
    config = json.loads((run_dir / "config.json").read_text())
    images = check_images_from(config["settings"]["data"])
    return export_and_check(run_graph(run_dir), images, out_dir)
