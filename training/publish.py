"""Publish a finished training run as an immutable registry version.

A run that held out a calibration split (``TrainSettings.calibration_fraction``, recorded
in config.json's ``dataset.calibration``) is published calibrated: the temperature and the
OOD threshold are fitted on those held-out training images, every figure is measured on
the test set, the int8 export is built and gated (``training.calibrate``), and the served
graph has the third output ``ood_score``. A run without one is published as before.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from registry import ModelVersion, Registry
from registry.files import sha256_file
from registry.manifest import (
    GOLDEN_FILE,
    WEIGHTS_FILE,
    InputSpec,
    Metrics,
    ModelInfo,
    Normalization,
    VersionSpec,
)
from seednet.export import ExportError, golden_set, materialize
from seednet.graph import model_from_weights
from seednet.model import SeedNetConfig, build_model, count_macs, count_parameters
from training.calibrate import (
    CalibrateSettings,
    Inputs,
    calibrate_network,
    calibration_parts,
    check_version_metadata,
    density_images,
    quantization_images,
    record_exports,
)
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


def held_out_images(run_dir: Path) -> int:
    """How many training images the run held out for calibration (0: none)."""
    config = json.loads((run_dir / "config.json").read_text())
    return int(((config.get("dataset") or {}).get("calibration") or {}).get("images") or 0)


def publish_run(
    run_dir: Path,
    name: str,
    root: Path | str,
    alias: str | None = None,
    exports: bool = True,
    parent: str | None = None,
    force: bool = False,
    calibration: CalibrateSettings | None = None,
) -> ModelVersion:
    """Copy a run's weights and reports into ``root`` as ``name@<next version>``.

    A golden set (64 real test images and the eager outputs) goes with the weights so
    any machine can prove that derived exports compute the same thing. A run whose
    weights are already published returns that version (``existing``) unless ``force``.
    A run with a held-out calibration split is published calibrated (``calibration``:
    the settings, default :class:`CalibrateSettings` with the run's test-image limit).
    """
    registry = Registry(root)
    spec = version_spec(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    images = check_images_from(config["settings"]["data"])
    files: dict[str, Path] = {WEIGHTS_FILE: run_dir / "model.safetensors"}
    files |= {f: run_dir / f for f in RUN_FILES if (run_dir / f).exists()}
    if held_out_images(run_dir):
        return _publish_calibrated_run(
            run_dir, name, registry, spec, files, images, alias, exports, parent, force, calibration
        )
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


def _publish_calibrated_run(
    run_dir: Path,
    name: str,
    registry: Registry,
    spec: VersionSpec,
    files: dict[str, Path],
    images,
    alias: str | None,
    exports: bool,
    parent: str | None,
    force: bool,
    settings: CalibrateSettings | None,
) -> ModelVersion:
    config = json.loads((run_dir / "config.json").read_text())
    data = config["settings"]["data"]
    if settings is None:
        settings = CalibrateSettings(test_limit_per_class=config["settings"]["limit_per_class"])
    weights = run_dir / "model.safetensors"
    fit, evaluate, test, reverse = calibration_parts(data, config["dataset"], settings)
    norm = config["normalization"]
    inputs = Inputs(
        model=model_from_weights(config["model_config"], weights),
        weights=weights,
        weights_sha256=sha256_file(weights),
        mean=tuple(norm["mean"]),
        std=tuple(norm["std"]),
        fit=fit,
        evaluate=evaluate,
        test=test,
        quantization=quantization_images(data, settings.quantization_per_class),
        golden_images=images,
        reverse=reverse,
        density=density_images(data, config["dataset"], settings),
    )
    with registry.scratch(name) as tmp:  # the registry's temp area: cleaned if killed
        result = calibrate_network(inputs, spec, settings, name, Path(tmp))
        mv = registry.publish(name, files | result.files, result.spec, parent=parent, force=force)
        if exports and not (mv.existing and registry.derived(mv).get("files")):
            record_exports(registry, mv, result.exports)
            problems = check_version_metadata(registry, mv)
            if problems:
                raise ExportError(f"{mv.ref}: {problems}")
    if alias:
        registry.set_alias(name, alias, mv.version)
    return mv
