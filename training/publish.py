"""Publish a finished training run as an immutable registry version."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from service.registry import ModelVersion, Registry
from training.export import GOLDEN_FILE, check_images_from, golden_set, inference_model, materialize
from training.model import SeedNetConfig, build_model, count_macs, count_parameters

# Run artefacts copied into the version as they are (all small except the weights).
RUN_FILES = (
    "metrics.jsonl",
    "summary.json",
    "confusion_matrix.json",
    "confusion_matrix.png",
    "curves.png",
    "attention_per_class.json",
    "test_predictions.json",
)


def version_metadata(run_dir: Path) -> dict:
    """The manifest's content (the registry adds name, version, files, created, revision)."""
    config = json.loads((run_dir / "config.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    model_cfg = SeedNetConfig.from_dict(config["model_config"])
    return {
        "model": {
            "architecture": "SeedNet",
            "arch": config["arch"],
            "config": config["model_config"],
            # counted on an uninitialised build: the weights need not be loaded for this
            "parameters": count_parameters(build_model(model_cfg, init=False)),
            "macs_per_image": count_macs(model_cfg),
            "blocks": model_cfg.num_blocks,
            "branches_per_block": model_cfg.branches_per_block,
        },
        "recipe": config["recipe"],
        "dataset": config["dataset"] | {"description": summary.get("dataset")},
        "metrics": {
            k: summary.get(k)
            for k in (
                "test_accuracy",
                "test_accuracy_flip_tta",
                "test_loss",
                "per_class_accuracy",
                "test_images",
            )
        },
        "training": {k: summary.get(k) for k in ("epochs", "train_seconds", "device", "weights")},
        "class_names": config["class_names"],
        "input": {"size": config["input_size"], "dtype": "uint8", "layout": "NCHW RGB"},
        "input_size": config["input_size"],
        "normalization": config["normalization"],
    }


def publish_run(
    run_dir: Path,
    name: str,
    root: Path,
    alias: str | None = None,
    exports: bool = True,
    parent: str | None = None,
) -> ModelVersion:
    """Copy a run's weights and reports into ``root`` as ``name@<next version>``.

    A golden set (64 real test images and the eager outputs) goes with the weights so
    any machine can prove that derived exports compute the same thing.
    """
    registry = Registry(root)
    metadata = version_metadata(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    model = inference_model(
        config["model_config"], run_dir / "model.safetensors", config["normalization"]
    )
    images = check_images_from(config["settings"]["data"])
    files: dict[str, Path] = {"weights.safetensors": run_dir / "model.safetensors"}
    files |= {f: run_dir / f for f in RUN_FILES if (run_dir / f).exists()}
    with tempfile.TemporaryDirectory() as tmp:
        golden = Path(tmp) / GOLDEN_FILE
        save_file(golden_set(model, images), str(golden))
        files[GOLDEN_FILE] = golden
        mv = registry.publish(name, files, metadata, parent=parent)
    if exports:
        materialize(registry, mv)
    if alias:
        registry.set_alias(name, alias, mv.version)
    return mv
