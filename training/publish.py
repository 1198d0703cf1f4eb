"""Publish a finished training run as an immutable registry version."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from registry import ModelVersion, Registry
from registry.manifest import (
    GOLDEN_FILE,
    WEIGHTS_FILE,
    InputSpec,
    Metrics,
    ModelInfo,
    Normalization,
    VersionSpec,
)
from seednet.export import golden_set, materialize
from seednet.model import SeedNetConfig, build_model, count_macs, count_parameters
from training.export import check_images_from, run_graph

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
_METRICS = ("test_accuracy", "test_accuracy_flip_tta", "test_loss", "per_class_accuracy")


def version_spec(run_dir: Path) -> VersionSpec:
    """What the manifest says of a run (the registry adds name, version, files, ...)."""
    config = json.loads((run_dir / "config.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    model_cfg = SeedNetConfig.from_dict(config["model_config"])
    norm = config["normalization"]
    return VersionSpec(
        model=ModelInfo(
            architecture="SeedNet",
            arch=config["arch"],
            config=config["model_config"],
            # counted on an uninitialised build: the weights need not be loaded for this
            parameters=count_parameters(build_model(model_cfg, init=False)),
            macs_per_image=count_macs(model_cfg),
            blocks=model_cfg.num_blocks,
            branches_per_block=model_cfg.branches_per_block,
        ),
        class_names=tuple(config["class_names"]),
        normalization=Normalization(mean=tuple(norm["mean"]), std=tuple(norm["std"])),
        input=InputSpec(size=tuple(config["input_size"])),
        metrics=Metrics(
            **{k: summary.get(k) for k in _METRICS}, test_images=summary.get("test_images")
        ),
        recipe=config["recipe"],
        dataset=config["dataset"] | {"description": summary.get("dataset")},
        training={k: summary.get(k) for k in ("epochs", "train_seconds", "device", "weights")},
    )


def publish_run(
    run_dir: Path,
    name: str,
    root: Path | str,
    alias: str | None = None,
    exports: bool = True,
    parent: str | None = None,
    force: bool = False,
) -> ModelVersion:
    """Copy a run's weights and reports into ``root`` as ``name@<next version>``.

    A golden set (64 real test images and the eager outputs) goes with the weights so
    any machine can prove that derived exports compute the same thing. A run whose
    weights are already published returns that version (``existing``) unless ``force``.
    """
    registry = Registry(root)
    spec = version_spec(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    images = check_images_from(config["settings"]["data"])
    files: dict[str, Path] = {WEIGHTS_FILE: run_dir / "model.safetensors"}
    files |= {f: run_dir / f for f in RUN_FILES if (run_dir / f).exists()}
    with registry.scratch(name) as tmp:  # the registry's temp area: cleaned if killed
        golden = tmp / GOLDEN_FILE
        save_file(golden_set(run_graph(run_dir), images), str(golden))
        files[GOLDEN_FILE] = golden
        mv = registry.publish(name, files, spec, parent=parent, force=force)
    if exports and not (mv.existing and registry.derived(mv).get("files")):
        materialize(registry, mv)
    if alias:
        registry.set_alias(name, alias, mv.version)
    return mv
