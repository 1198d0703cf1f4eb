"""A calibrated version: temperature, OOD score and threshold, int8 gate, one publish.

``python -m training calibrate seednet@1 --data ../shared/cifar10 --register`` runs, for
the weights of an existing version (which stay as they are):

1. **logits** of the network on the fitting images, the evaluation images, the whole
   test set, the out-of-distribution sets (``data/ood``, :mod:`training.ood_sets`) and
   corrupted copies of the evaluation images, by ONNX Runtime (cached by weights and
   images under ``data/calibration-cache``);
2. **fit** the calibration (by default a temperature per image from its confidence,
   :mod:`seednet.temperature`; side by side, one temperature, vector scaling and
   histogram binning) on images the network never trained on, and measure ECE / NLL /
   Brier before and after on other images; the OOD scores with their AUROC and FPR
   at 95 % TPR per set; the threshold that keeps 95 % of the fitting images;
3. **export** the calibrated graph (TorchScript, ONNX, OpenVINO) and prove it against
   eager on the golden set, metadata (temperature and curve) included;
4. **int8**: quantise that ONNX export and gate it on the full test set (within 0.5
   points of fp32); when it passes it is published as a version file (``int8.onnx``);
5. **publish** (``--register``) the same weights as a new version with ``parent`` set,
   the calibration, OOD and int8 sections and the figures in its manifest, then build
   and verify its exports; ``--alias`` moves an alias to it only when every test image
   keeps its top-1 class and the ECE went down.

Which images fit what (:func:`split_test_halves`): the committed versions trained on all
50,000 training images, so the 10,000 test images are split in two halves by the parity
of each image's index within its class folder (sorted file names): the temperature and
the OOD threshold are fitted on the even half and every figure is measured on the odd
half; the reverse fit is reported too. A version trained with a held-out calibration
split (``TrainSettings.calibration_fraction``, recorded in ``dataset.calibration``) is
fitted on those training images instead and measured on the whole test set.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file as save_numpy

from registry import IntegrityError, ModelVersion, Registry
from registry.manifest import (
    GOLDEN_FILE,
    PUBLISHED_INT8_FILE,
    WEIGHTS_FILE,
    Calibration,
    Int8Gate,
    OutOfDistribution,
    VersionSpec,
)
from seednet.export import (
    ExportError,
    ExportReport,
    check_version_metadata,
    export_and_check,
    export_metadata,
    golden_set,
    materialize,
    save_onnx,
)
from seednet.graph import (
    CalibratedInferenceModel,
    DensityCalibratedInferenceModel,
    InferenceModel,
    model_from_weights,
)
from seednet.model import SeedNet
from seednet.ood import DENSITY_FILE, DENSITY_SCORE, FeatureDensity, fit_gaussians, standardise
from seednet.quantize import build_int8, int8_details
from seednet.runtimes import ort_outputs, ort_session
from seednet.temperature import METHOD as CURVE_METHOD
from seednet.temperature import ConfidenceTemperature
from training import calibration as cal
from training.data import ImageSet, holdout_mask, load_split, within_class_index

CALIBRATION_REPORT_FILE = "calibration.json"
RELIABILITY_FILE = "reliability.png"
DEFAULT_CACHE = Path("data/calibration-cache")
DEFAULT_OOD = Path("data/ood")


@dataclass(frozen=True)
class CalibrateSettings:
    """What ``training calibrate`` does; every field has the CLI's default."""

    # what the served probabilities are: "confidence-temperature" (one temperature per
    # image, from its confidence: seednet.temperature) or "temperature" (one number)
    calibration: str = CURVE_METHOD
    ood_score: str = DENSITY_SCORE
    # the stage whose channel means the density+energy score reads (negative: from the
    # end); -2, the input of the last stage's attention, was the best single stage of
    # both shipped networks on the OOD sets (docs/calibration.md)
    ood_stage: int = -2
    density_per_class: int = 500  # training images per class for the class Gaussians
    target_kept: float = cal.TARGET_KEPT
    bins: int = cal.ECE_BINS
    ood_dir: Path | None = DEFAULT_OOD
    cache_dir: Path | None = DEFAULT_CACHE
    int8: bool = True
    max_drop_points: float = 0.5
    quantization_per_class: int = 30  # training images per class for int8's ranges
    test_limit_per_class: int | None = None  # first K test images per class (tests)
    corruptions: tuple[str, ...] = ("blur", "pixelate")
    ood_per_set: int | None = None  # the first K images of each OOD set (None: all)
    shift_per_class: int | None = None  # corrupt the first K evaluation images per class


# ----------------------------------------------------------------- which images
@dataclass
class Part:
    """Images with labels and a description of where they come from."""

    images: np.ndarray
    labels: np.ndarray
    description: dict


def split_test_halves(test: ImageSet) -> tuple[Part, Part]:
    """(even, odd): the test images whose index within their class is even / odd."""
    images, labels = test.images.numpy(), test.labels.numpy()
    parity = within_class_index(labels) % 2
    source = {k: v for k, v in test.description.items() if k not in ("count", "path")}
    halves = []
    for p, name in ((0, "even"), (1, "odd")):
        keep = parity == p
        halves.append(
            Part(
                images[keep],
                labels[keep],
                source
                | {
                    "split": "test",
                    "half": name,
                    "rule": f"index within the class folder (sorted file names) is {name}",
                    "images": int(keep.sum()),
                },
            )
        )
    return halves[0], halves[1]


# ----------------------------------------------------------------- logits
class LogitsGraph(InferenceModel):
    """uint8 images in, logits and every stage's channel means out (normalisation as
    served): for measuring only."""

    def __init__(self, model: SeedNet, mean, std) -> None:
        super().__init__(model, mean, std)
        self.output_names = ("logits", *(f"stage{i}" for i in range(len(model.stages))))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        logits, _, means = self.model.forward_with_stage_means(self.normalize(images))
        return (logits.float(), *means)


class LogitsRunner:
    """Logits and stage features of one network by ONNX Runtime (a dict of arrays per
    call), cached on disk by weights and images."""

    def __init__(
        self,
        model: SeedNet,
        weights_sha256: str,
        mean,
        std,
        cache_dir: Path | None,
        example: np.ndarray,
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory()
        path = Path(self._tmp.name) / "logits.onnx"
        save_onnx(LogitsGraph(model, mean, std).eval(), path, torch.from_numpy(example[:2]))
        self.session = ort_session(path, "cpu")
        self.cache = Path(cache_dir) / weights_sha256[:16] if cache_dir else None
        self.names = [o.name for o in self.session.get_outputs()]

    def __call__(self, images: np.ndarray, batch: int = 250) -> dict[str, np.ndarray]:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        key = hashlib.sha256(images.tobytes()).hexdigest()[:16]
        cached = self.cache / f"{key}.npz" if self.cache else None
        if cached is not None and cached.is_file():
            with np.load(cached) as stored:
                return {k: stored[k] for k in stored.files}
        parts = [
            ort_outputs(self.session, images[i : i + batch]) for i in range(0, len(images), batch)
        ]
        if parts:
            out = {k: np.concatenate([p[k] for p in parts]) for k in self.names}
        else:
            out = {k: np.zeros((0, 10), np.float32) for k in self.names}
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            with open(cached, "wb") as f:
                np.savez(f, **out)
        return out

    def close(self) -> None:
        self._tmp.cleanup()


# ----------------------------------------------------------------- the figures
#: calibration method (manifest ``calibration.method``) -> its row in the comparison
METHOD_ROWS = {"temperature": "temperature", CURVE_METHOD: "confidence_temperature"}


def compare_methods(
    fit_z: np.ndarray, fit_y: np.ndarray, eval_z: np.ndarray, eval_y: np.ndarray, bins: int
) -> dict:
    """Every method fitted on (fit_z, fit_y), measured on (eval_z, eval_y)."""
    # rounded once, here: every figure below is of the number the manifest and graph hold
    t = round(cal.fit_temperature(fit_z, fit_y), 6)
    curve = cal.fit_confidence_temperature(fit_z, fit_y)
    vector = cal.VectorScaling().fit(fit_z, fit_y)
    histogram = cal.HistogramBinning(bins).fit(cal.softmax(fit_z), fit_y)
    raw = cal.softmax(eval_z)
    top1 = raw.argmax(1)
    rows = {
        "uncalibrated": raw,
        "temperature": cal.softmax(eval_z, t),
        "confidence_temperature": curve.probabilities(eval_z),
        "vector_scaling": vector.probabilities(eval_z),
        "histogram_binning": histogram.probabilities(raw),
    }
    out = {"temperature": t, "curve": curve.to_dict(), "methods": {}}
    for name, probs in rows.items():
        out["methods"][name] = cal.summary(probs, eval_y, bins) | {
            "top1_changed": float((probs.argmax(1) != top1).mean())
        }
    return out


def served_curve(comparison: dict) -> dict | None:
    """The curve the version serves (``confidence-temperature``), else None."""
    return comparison["curve"] if comparison["method"] == CURVE_METHOD else None


def _served_curve(comparison: dict) -> ConfidenceTemperature | None:
    curve = served_curve(comparison)
    return ConfidenceTemperature.from_dict(curve) if curve is not None else None


def served_probabilities(comparison: dict) -> Callable[[np.ndarray], np.ndarray]:
    """``logits -> probabilities`` as the version's graph will serve them: with the curve
    for ``confidence-temperature``, else the one temperature (``comparison["method"]``)."""
    curve = _served_curve(comparison)
    if curve is not None:
        return curve.probabilities
    t = comparison["temperature"]
    return lambda z: cal.softmax(z, t)


Outputs = dict[str, np.ndarray]  # what LogitsRunner returns for a set of images


def density_for(
    stage: int, temperature: float, train: Outputs, train_y: np.ndarray, fit: Outputs
) -> FeatureDensity:
    """The class Gaussians of ``stage``'s features (training images) and the four
    standardising scalars (the fitting images: held out, in distribution)."""
    features = f"stage{stage}"
    means, whitening = fit_gaussians(train[features], train_y, train["logits"].shape[1])
    raw = FeatureDensity(stage, means, whitening, 0.0, 1.0, 0.0, 1.0)
    e_loc, e_scale = standardise(cal.energy_score(fit["logits"], temperature))
    d_loc, d_scale = standardise(raw.density(fit[features]))
    return FeatureDensity(stage, means, whitening, e_loc, e_scale, d_loc, d_scale)


def score_function(
    method: str, temperature: float, density: FeatureDensity | None = None
) -> Callable[[Outputs], np.ndarray]:
    """``outputs -> scores`` for one OOD score (higher: less like the training images)."""
    if density is not None:
        key = f"stage{density.stage}"
        return lambda o: density.score(cal.energy_score(o["logits"], temperature), o[key])
    return lambda o: cal.ood_scores(method, o["logits"], temperature)


def ood_figures(
    score: Callable[[Outputs], np.ndarray],
    fit: Outputs,
    evaluate: Outputs,
    sets: dict[str, Outputs],
    target_kept: float,
) -> dict:
    """Threshold from the fitting images, quality per set against the evaluation images."""
    fit_scores = score(fit)
    eval_scores = score(evaluate)
    threshold = cal.threshold_for_kept(fit_scores, target_kept)
    per_set = {}
    for name, o in sets.items():
        s = score(o)
        per_set[name] = {
            "images": int(len(s)),
            "auroc": cal.auroc(eval_scores, s),
            "fpr_at_95_tpr": cal.fpr_at_tpr(eval_scores, s, 0.95),
            "flagged": cal.flagged(s, threshold),
        }
    return {
        "threshold": threshold,
        "kept": 1.0 - cal.flagged(eval_scores, threshold),
        "sets": per_set,
        "in_distribution": {
            "mean": float(eval_scores.mean()),
            "p05": float(np.quantile(eval_scores, 0.05)),
            "p95": float(np.quantile(eval_scores, 0.95)),
        },
    }


@dataclass
class CalibrationResult:
    """What was fitted and measured; ``spec``/``files`` are what a publish writes."""

    temperature: float
    report: dict
    spec: VersionSpec | None = None
    files: dict[str, Path] = field(default_factory=dict)
    int8: Int8Gate | None = None
    version: ModelVersion | None = None
    seconds: float = 0.0
    exports: ExportReport | None = None  # proven exports of the calibrated graph (workdir)

    def table(self) -> str:
        r = self.report
        lines = [
            f"temperature {self.temperature:.4f} (fitted on {r['fitted_on']['images']} "
            f"{r['fitted_on'].get('half', 'held-out')} images)"
        ]
        lines.append(
            f"{'method':<24}{'accuracy':>9}{'conf.':>8}{'ECE':>8}{'NLL':>8}{'Brier':>8}"
            f"{'top-1 moved':>12}"
        )
        for name, m in r["comparison"]["methods"].items():
            lines.append(
                f"{name:<24}{m['accuracy'] * 100:>8.2f}%{m['mean_confidence'] * 100:>7.2f}%"
                f"{m['ece'] * 100:>7.2f}%{m['nll']:>8.4f}{m['brier']:>8.4f}"
                f"{m['top1_changed'] * 100:>11.2f}%"
            )
        row = METHOD_ROWS[r["comparison"]["method"]]
        lines.append(f"served: {row} ({_method_title(r['comparison'])})")
        if "reverse" in r:
            rev = r["reverse"]["methods"]
            lines.append(
                f"reverse fit (odd half -> even half): {row}, ECE "
                f"{rev['uncalibrated']['ece'] * 100:.2f}% -> {rev[row]['ece'] * 100:.2f}%, NLL "
                f"{rev['uncalibrated']['nll']:.4f} -> {rev[row]['nll']:.4f} (temperature "
                f"{r['reverse']['temperature']:.4f}: ECE {rev['temperature']['ece'] * 100:.2f}%)"
            )
        for kind, m in r.get("shift", {}).items():
            lines.append(
                f"shift {kind:<9} accuracy {m['uncalibrated']['accuracy'] * 100:.2f}%, "
                f"ECE {m['uncalibrated']['ece'] * 100:.2f}% -> {m['calibrated']['ece'] * 100:.2f}%"
                f", flagged {m['flagged'] * 100:.1f}%"
            )
        if r.get("ood"):
            lines.append(
                f"{'OOD set':<16}"
                + "".join(
                    f"  {m + ' AUROC':>28}{'FPR95':>8}{'flagged':>9}" for m in r["ood"]["scores"]
                )
            )
            names = next(iter(r["ood"]["scores"].values()))["sets"]
            for s in names:
                row = f"{s:<16}"
                for m in r["ood"]["scores"].values():
                    f = m["sets"][s]
                    row += (
                        f"  {f['auroc']:>28.4f}{f['fpr_at_95_tpr'] * 100:>7.1f}%"
                        f"{f['flagged'] * 100:>8.1f}%"
                    )
                lines.append(row)
            chosen = r["ood"]["scores"][r["ood"]["chosen"]]
            lines.append(
                f"OOD score {r['ood']['chosen']}: threshold {chosen['threshold']:.4f}, "
                f"kept {chosen['kept'] * 100:.2f}% of the evaluation images"
            )
        if self.int8 is not None:
            g = self.int8
            lines.append(
                f"int8 gate {'passed' if g.passed else 'REFUSED'}: {g.int8_accuracy * 100:.2f}% "
                f"vs fp32 {g.fp32_accuracy * 100:.2f}% on {g.test_images} test images "
                f"(drop {g.drop_points:+.2f} points, limit {g.max_drop_points:.2f})"
            )
        if self.version is not None:
            done = "already published" if self.version.existing else "published"
            lines.append(f"{done} {self.version.ref} (parent {self.version.manifest.parent})")
        return "\n".join(lines)


# ----------------------------------------------------------------- the pipeline
@dataclass
class Inputs:
    """Where the network and the images come from."""

    model: SeedNet
    weights: Path
    weights_sha256: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fit: Part
    evaluate: Part
    test: Part  # every test image: accuracy and the int8 gate
    quantization: np.ndarray  # training images for int8's activation ranges
    golden_images: torch.Tensor
    reverse: bool  # the two halves of one set: fit the other way round too
    density: Part | None = None  # training images for the density+energy score's Gaussians


def run_calibration(inputs: Inputs, settings: CalibrateSettings, workdir: Path) -> dict:
    """Steps 1-2 of the module docstring: every figure, as one JSON-able report."""
    runner = LogitsRunner(
        inputs.model,
        inputs.weights_sha256,
        inputs.mean,
        inputs.std,
        settings.cache_dir,
        inputs.test.images,
    )
    try:
        fit_o = runner(inputs.fit.images)
        eval_o = runner(inputs.evaluate.images)
        fit_z, eval_z = fit_o["logits"], eval_o["logits"]
        test_z = _test_logits(inputs, fit_z, eval_z, runner)
        fit_y, eval_y = inputs.fit.labels, inputs.evaluate.labels
        if settings.calibration not in METHOD_ROWS:
            raise ValueError(f"calibration must be one of {sorted(METHOD_ROWS)}")
        comparison = compare_methods(fit_z, fit_y, eval_z, eval_y, settings.bins)
        comparison["method"] = settings.calibration
        t = comparison["temperature"]  # the OOD score's, whichever the probabilities use
        calibrated = served_probabilities(comparison)
        report: dict = {
            "fitted_on": inputs.fit.description,
            "evaluated_on": inputs.evaluate.description,
            "bins": settings.bins,
            "comparison": comparison,
        }
        if inputs.reverse:
            report["reverse"] = compare_methods(eval_z, eval_y, fit_z, fit_y, settings.bins)
        raw_eval, cal_eval = cal.softmax(eval_z), calibrated(eval_z)
        report["reliability"] = {
            name: _reliability_json(cal.reliability(p, eval_y, settings.bins))
            for name, p in (("uncalibrated", raw_eval), ("calibrated", cal_eval))
        }
        test_y = inputs.test.labels
        report["test"] = {
            "images": int(len(test_y)),
            "accuracy": float((test_z.argmax(1) == test_y).mean()),
            "top1_changed_by_calibration": float(
                (calibrated(test_z).argmax(1) != test_z.argmax(1)).mean()
            ),
            "per_class_accuracy": {
                str(c): float((test_z.argmax(1)[test_y == c] == c).mean())
                for c in np.unique(test_y)
            },
        }
        ood_sets: dict[str, Outputs] = {}
        set_info: dict[str, dict] = {}
        if settings.ood_dir is not None and Path(settings.ood_dir).is_dir():
            from training.ood_sets import load_ood_sets

            for name, (images, info) in load_ood_sets(Path(settings.ood_dir)).items():
                ood_sets[name] = runner(images[: settings.ood_per_set])
                set_info[name] = info | {"images": len(ood_sets[name]["logits"])}
        shift = {}
        keep = np.ones(len(eval_y), dtype=bool)
        if settings.shift_per_class is not None:
            keep = within_class_index(eval_y) < settings.shift_per_class
        for kind in settings.corruptions:
            from training.ood_sets import CORRUPTIONS, corrupt

            shifted = runner(corrupt(inputs.evaluate.images[keep], kind))
            z = shifted["logits"]
            y = eval_y[keep]
            shift[kind] = {
                "description": CORRUPTIONS[kind],
                "images": f"the first {int(keep.sum())} evaluation images "
                f"({settings.shift_per_class or 'all'} per class)",
                "uncalibrated": cal.summary(cal.softmax(z), y, settings.bins),
                "calibrated": cal.summary(calibrated(z), y, settings.bins),
                "reliability": _reliability_json(cal.reliability(calibrated(z), y, settings.bins)),
                "_outputs": shifted,
            }
        functions = {method: score_function(method, t) for method in cal.OOD_SCORE_FUNCTIONS}
        density = None
        if inputs.density is not None:
            train_o = runner(inputs.density.images)
            stages = len(inputs.model.stages)
            chosen_stage = settings.ood_stage % stages
            for stage in range(stages):  # the chosen one, and every other as alternatives
                fitted = density_for(stage, t, train_o, inputs.density.labels, fit_o)
                name = DENSITY_SCORE if stage == chosen_stage else f"{DENSITY_SCORE}@stage{stage}"
                functions[name] = score_function(DENSITY_SCORE, t, fitted)
                if stage == chosen_stage:
                    density = fitted
        if settings.ood_score not in functions:
            raise ValueError(f"OOD score {settings.ood_score!r} needs the density images")
        scores = {
            name: ood_figures(fn, fit_o, eval_o, ood_sets, settings.target_kept)
            for name, fn in functions.items()
        }
        for m in shift.values():
            shifted = m.pop("_outputs")
            chosen = scores[settings.ood_score]
            m["flagged"] = cal.flagged(functions[settings.ood_score](shifted), chosen["threshold"])
        report["shift"] = shift
        report["ood"] = {
            "chosen": settings.ood_score,
            "target_kept": settings.target_kept,
            "set_info": set_info,
            "scores": scores,
        }
        if density is not None and settings.ood_score == DENSITY_SCORE:
            report["ood"]["features"] = density.scalars() | {
                "fitted_on": inputs.density.description,
                "standardised_on": inputs.fit.description,
            }
            report["_density"] = density  # the arrays: a version file, not the JSON report
        return report
    finally:
        runner.close()


def _test_logits(inputs: Inputs, fit_z, eval_z, runner: LogitsRunner) -> np.ndarray:
    """Logits of every test image: when the fit and evaluation images are the two halves of
    the test set, put together from theirs (no second pass), else computed."""
    if inputs.reverse:
        parity = within_class_index(inputs.test.labels) % 2
        out = np.empty((len(parity), fit_z.shape[1]), dtype=fit_z.dtype)
        out[parity == 0], out[parity == 1] = fit_z, eval_z
        return out
    return runner(inputs.test.images)["logits"]


def _reliability_json(r: cal.Reliability) -> dict:
    return {
        "edges": r.edges.tolist(),
        "counts": r.counts.tolist(),
        "confidence": [None if np.isnan(v) else float(v) for v in r.confidence],
        "accuracy": [None if np.isnan(v) else float(v) for v in r.accuracy],
        "ece": r.ece,
    }


def calibrated_spec(base: VersionSpec, report: dict, int8: Int8Gate | None) -> VersionSpec:
    """``base`` (the parent's spec or a run's) with the calibration sections and figures."""
    comparison = report["comparison"]["methods"]
    method = report["comparison"]["method"]
    before, after = comparison["uncalibrated"], comparison[METHOD_ROWS[method]]
    chosen = report["ood"]["scores"][report["ood"]["chosen"]]
    test = report["test"]
    names = list(base.class_names)
    metrics = replace(
        base.metrics,
        test_accuracy=test["accuracy"],
        test_accuracy_flip_tta=None,  # the served graph has no test-time augmentation
        test_loss=None,  # NLL of the calibrated probabilities: ``nll`` (held-out images)
        per_class_accuracy={names[int(c)]: v for c, v in test["per_class_accuracy"].items()},
        test_images=test["images"],
        ece=after["ece"],
        nll=after["nll"],
        brier=after["brier"],
        uncalibrated_ece=before["ece"],
        uncalibrated_nll=before["nll"],
        uncalibrated_brier=before["brier"],
        ece_bins=report["bins"],
        calibration_eval_images=after["images"],
    )
    calibration = Calibration(
        method=method,
        temperature=report["comparison"]["temperature"],
        curve=served_curve(report["comparison"]),
        fitted_on=report["fitted_on"],
        evaluated_on=report["evaluated_on"],
        details={
            "formula": {
                "temperature": "probabilities = softmax(logits / temperature), inside the "
                "served graph",
                CURVE_METHOD: "probabilities = softmax(logits / T(c)), c = max(softmax("
                "logits)), T(c) = exp(log_t0 - sum_i slopes[i] * max(0, c - knots[i])), "
                "inside the served graph (seednet.temperature); the OOD score uses "
                "`temperature`",
            }[method],
            "compared": {k: v for k, v in comparison.items()},
            **({"reverse_fit": report["reverse"]} if "reverse" in report else {}),
            "shift": {
                kind: {
                    "description": m["description"],
                    "uncalibrated": m["uncalibrated"],
                    "calibrated": m["calibrated"],
                    "flagged": m["flagged"],
                }
                for kind, m in report["shift"].items()
            },
        },
    )
    alternatives = {
        k: v for k, v in report["ood"]["scores"].items() if k != report["ood"]["chosen"]
    }
    ood = OutOfDistribution(
        score=report["ood"]["chosen"],
        threshold=chosen["threshold"],
        target_kept=report["ood"]["target_kept"],
        kept=chosen["kept"],
        fitted_on=report["fitted_on"],
        sets={
            name: figures
            | {
                k: v
                for k, v in report["ood"]["set_info"].get(name, {}).items()
                if k in ("description", "far_ood")
            }
            for name, figures in chosen["sets"].items()
        },
        details={
            "rule": "out_of_distribution = ood_score > threshold",
            "formula": {
                "energy": "ood_score = -logsumexp(logits / T) (the free energy / T)",
                "max_softmax": "ood_score = -max(softmax(logits / T))",
                DENSITY_SCORE: "ood_score = (energy - energy_loc) / energy_scale + (density - "
                "density_loc) / density_scale; energy = -logsumexp(logits / T), density = "
                "-logsumexp_c(-|W (f - mu_c)|^2 / 2) of f, the channel means of stage "
                "`features.stage`'s output (seednet.ood)",
            }[report["ood"]["chosen"]],
            "measured_against": report["evaluated_on"],
            "in_distribution_scores": chosen["in_distribution"],
            "alternatives": alternatives,
        },
        features={k: v for k, v in report["ood"].get("features", {}).items()},
    )
    dataset = dict(base.dataset)
    return replace(
        base, metrics=metrics, calibration=calibration, ood=ood, int8=int8, dataset=dataset
    )


def build_artefacts(
    inputs: Inputs, report: dict, settings: CalibrateSettings, workdir: Path
) -> tuple[dict[str, Path], Int8Gate | None, ExportReport]:
    """Steps 3-4: the calibrated graph's golden set, its exports proven, int8 gated."""
    t = report["comparison"]["temperature"]
    curve = _served_curve(report["comparison"])
    density: FeatureDensity | None = report.get("_density")
    files: dict[str, Path] = {}
    if report["ood"]["chosen"] == DENSITY_SCORE:
        assert density is not None
        graph: InferenceModel = DensityCalibratedInferenceModel(
            inputs.model, t, density, inputs.mean, inputs.std, curve
        )
        density.save(workdir / DENSITY_FILE)
        files[DENSITY_FILE] = workdir / DENSITY_FILE
    else:
        graph = CalibratedInferenceModel(
            inputs.model, t, report["ood"]["chosen"], inputs.mean, inputs.std, curve
        )
    graph.eval()
    golden = golden_set(graph, inputs.golden_images)
    golden_path = workdir / GOLDEN_FILE
    save_numpy({k: v.numpy() for k, v in golden.items()}, str(golden_path))
    files[GOLDEN_FILE] = golden_path
    exports = export_and_check(graph, inputs.golden_images, workdir / "exports")
    gate = None
    if settings.int8:
        dest = workdir / PUBLISHED_INT8_FILE
        int8_report = build_int8(
            exports.files["model.onnx"],
            dest,
            inputs.quantization,
            {k: v.numpy() for k, v in golden.items()},
            inputs.test.images,
            inputs.test.labels,
            max_drop_points=settings.max_drop_points,
            fp32_accuracy=report["test"]["accuracy"],
        )
        details = int8_details(int8_report) | {
            "fp32_measured": "ONNX Runtime fp32 on the same images: the argmax of the logits "
            "(dividing by a positive temperature, one per image, does not move it)",
            "test_data": inputs.test.description,
            "metadata": export_metadata(dest),
        }
        gate = Int8Gate(
            passed=int8_report.passed,
            fp32_accuracy=int8_report.fp32_accuracy,
            int8_accuracy=int8_report.int8_accuracy,
            test_images=int8_report.test_images,
            max_drop_points=settings.max_drop_points,
            file=PUBLISHED_INT8_FILE if int8_report.passed else None,
            details=details,
        )
        if int8_report.passed:
            files[PUBLISHED_INT8_FILE] = dest
    return files, gate, exports


def _method_title(comparison: dict) -> str:
    curve = _served_curve(comparison)
    if curve is not None:  # its temperature at confidence 0 and 1 (highest, lowest)
        t0, t1 = curve.temperature(np.array([0.0, 1.0]))
        return f"confidence temperature {t0:.2f}..{t1:.2f}"
    return f"temperature {comparison['temperature']:.3f}"


def plot_files(report: dict, title: str, workdir: Path) -> dict[str, Path]:
    from training.reports import plot_reliability

    path = workdir / RELIABILITY_FILE
    panels = [
        (f"{title}: uncalibrated", report["reliability"]["uncalibrated"]),
        (f"{title}: {_method_title(report['comparison'])}", report["reliability"]["calibrated"]),
    ]
    for kind, m in report.get("shift", {}).items():
        panels.append((f"{title}: {kind}, calibrated", m["reliability"]))
    plot_reliability(panels, path)
    return {RELIABILITY_FILE: path}


def find_existing(
    registry: Registry,
    parent: ModelVersion,
    temperature: float,
    threshold: float,
    curve: dict | None = None,
) -> ModelVersion | None:
    """A version already published from ``parent`` with its weights, this temperature (and
    curve) and this OOD threshold (a retried publish returns it instead of adding
    another version)."""
    weights_sha = parent.manifest.files[WEIGHTS_FILE].sha256
    for mv in registry.versions(parent.name):
        try:
            m = mv.manifest
        except IntegrityError:
            continue  # verify reports it; it is not ours to return
        entry = m.files.get(WEIGHTS_FILE)
        if (
            m.parent == parent.ref
            and entry is not None
            and entry.sha256 == weights_sha
            and m.calibration is not None
            and m.calibration.temperature == temperature
            and m.calibration.curve == curve
            and m.ood is not None
            and m.ood.threshold == threshold
        ):
            return replace(mv, existing=True)
    return None


def calibration_parts(data: str, dataset: dict, settings: CalibrateSettings):
    """(fit, evaluate, test, reverse) for a network whose ``dataset`` record (manifest or
    config.json) says whether it held out a calibration split."""
    test = load_split(data, "test", settings.test_limit_per_class)
    test_part = Part(test.images.numpy(), test.labels.numpy(), _describe(test, "test"))
    held = (dataset or {}).get("calibration") or {}
    if held.get("images"):
        limit = ((dataset or {}).get("train") or {}).get("limit_per_class")
        train = load_split(data, "train", limit)
        mask = holdout_mask(train.labels.numpy(), float(held["fraction"]))
        fit = Part(
            train.images.numpy()[mask],
            train.labels.numpy()[mask],
            dict(held) | {"split": "train, held out of training", "images": int(mask.sum())},
        )
        return fit, test_part, test_part, False
    fit, evaluate = split_test_halves(test)
    return fit, evaluate, test_part, True


def density_images(data: str, dataset: dict, settings: CalibrateSettings) -> Part | None:
    """Training images the network trained on, the first ``density_per_class`` of each
    class (never a held-out calibration image): where the density+energy score's class
    Gaussians are fitted. None when the score is not wanted."""
    if settings.ood_score != DENSITY_SCORE or settings.density_per_class <= 0:
        return None
    per_class = settings.density_per_class
    trained_limit = ((dataset or {}).get("train") or {}).get("limit_per_class")
    if trained_limit:  # a network trained on a slice: its own images only
        per_class = min(per_class, int(trained_limit))
    train = load_split(data, "train", per_class)
    images, labels = train.images.numpy(), train.labels.numpy()
    held = (dataset or {}).get("calibration") or {}
    if held.get("images"):
        trained = ~holdout_mask(labels, float(held["fraction"]))
        images, labels = images[trained], labels[trained]
    return Part(
        images,
        labels,
        _describe(train, "train")
        | {"images": len(labels), "per_class": settings.density_per_class},
    )


def calibrate_network(
    inputs: Inputs,
    base: VersionSpec,
    settings: CalibrateSettings,
    title: str,
    workdir: Path,
    report_dir: Path | None = None,
    report: dict | None = None,
) -> CalibrationResult:
    """Figures (``report``, when already measured), artefacts and the spec of the
    calibrated version; files under ``workdir``."""
    if report is None:
        report = run_calibration(inputs, settings, workdir)
    files, gate, exports = build_artefacts(inputs, report, settings, workdir)
    spec = calibrated_spec(base, report, gate)
    report_path = workdir / CALIBRATION_REPORT_FILE
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    report_path.write_text(json.dumps(public, indent=1, sort_keys=True) + "\n")
    files[CALIBRATION_REPORT_FILE] = report_path
    files |= plot_files(report, title, workdir)
    if report_dir is not None:
        report_dir = Path(report_dir)
        report_dir.mkdir(parents=True, exist_ok=True)
        for name in (CALIBRATION_REPORT_FILE, RELIABILITY_FILE):
            (report_dir / f"{title}-{name}").write_bytes(files[name].read_bytes())
    return CalibrationResult(
        report["comparison"]["temperature"], report, spec, files, gate, exports=exports
    )


def quantization_images(data: str, per_class: int) -> np.ndarray:
    """Training images for the int8 export's activation ranges (the first of each class)."""
    return load_split(data, "train", per_class).images.numpy()


def calibrate_version(
    registry: Registry,
    parent: ModelVersion,
    data: str,
    settings: CalibrateSettings,
    register: bool = False,
    alias: str | None = None,
    report_dir: Path | None = None,
) -> CalibrationResult:
    """The whole pipeline for an existing version (see the module docstring)."""
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    m = parent.manifest
    weights = registry.open_verified(parent, WEIGHTS_FILE)
    fit, evaluate, test, reverse = calibration_parts(data, m.dataset, settings)
    inputs = Inputs(
        model=model_from_weights(m.model.config, weights),
        weights=weights,
        weights_sha256=m.files[WEIGHTS_FILE].sha256,
        mean=m.normalization.mean,
        std=m.normalization.std,
        fit=fit,
        evaluate=evaluate,
        test=test,
        quantization=quantization_images(data, settings.quantization_per_class),
        golden_images=load_file(str(registry.open_verified(parent, GOLDEN_FILE)))["images"],
        reverse=reverse,
        density=density_images(data, m.dataset, settings),
    )
    base = VersionSpec(**{f: getattr(m, f) for f in VersionSpec.__dataclass_fields__})
    with registry.scratch(parent.name) as tmp:  # the registry's temp area: cleaned if killed
        report = run_calibration(inputs, settings, Path(tmp))
        chosen = report["ood"]["scores"][report["ood"]["chosen"]]
        t = report["comparison"]["temperature"]
        curve = served_curve(report["comparison"])
        existing = (
            find_existing(registry, parent, t, chosen["threshold"], curve) if register else None
        )
        if existing is not None:  # a retry: nothing to build, nothing to publish
            result = CalibrationResult(t, report, existing.manifest, {}, existing.manifest.int8)
            result.version = existing
        else:
            result = calibrate_network(
                inputs, base, settings, parent.name, Path(tmp), report_dir, report
            )
            if register:
                result.version = publish_calibrated(registry, parent, result)
        if alias and result.version is not None:
            promote_if_better(registry, result, alias)
    result.seconds = time.perf_counter() - t0
    return result


def _describe(data: ImageSet, split: str) -> dict:
    return {k: v for k, v in data.description.items() if k != "path"} | {
        "split": split,
        "images": len(data),
    }


def publish_calibrated(
    registry: Registry, parent: ModelVersion, result: CalibrationResult
) -> ModelVersion:
    """Publish ``result.spec`` with the parent's weights and reports plus ``result.files``,
    record its proven exports and verify everything. A version already published from the
    same parent with the same calibration is returned (``existing``) instead."""
    spec, files = result.spec, result.files
    existing = find_existing(
        registry,
        parent,
        spec.calibration.temperature,
        spec.ood.threshold,
        spec.calibration.curve,
    )
    if existing is not None:
        return existing
    carried = {
        name: registry.open_verified(parent, name)
        for name in parent.manifest.files
        if name not in files and name not in _NOT_CARRIED
    }
    # The same weights as the parent by design: ``force`` skips the registry's "same
    # weights, same version" shortcut; find_existing above keeps a retry idempotent.
    mv = registry.publish(parent.name, carried | files, spec, parent=parent.ref, force=True)
    record_exports(registry, mv, result.exports)
    problems = registry.verify(mv) + check_version_metadata(registry, mv)
    if problems:
        raise ExportError(f"{mv.ref} does not verify after publication: {problems}")
    return mv


# A parent's own calibration files are never carried into its child.
_NOT_CARRIED = (
    GOLDEN_FILE,
    PUBLISHED_INT8_FILE,
    CALIBRATION_REPORT_FILE,
    RELIABILITY_FILE,
    DENSITY_FILE,
)


def record_exports(registry: Registry, mv: ModelVersion, exports: ExportReport | None) -> None:
    """Record the exports proven before publication (built from the same graph that made
    the golden set) as the version's derived files; without them, rebuild them."""
    if exports is None or not all(p.is_file() for p in exports.files.values()):
        materialize(registry, mv)
        return
    registry.add_derived(mv, exports.files, exports.to_info())


def promote_if_better(registry: Registry, result: CalibrationResult, alias: str) -> bool:
    """Move ``alias`` to the new version when no test image changed its top-1 class and
    the ECE went down: below the uncalibrated network's, and below that of the version the
    alias points at when it serves the same weights calibrated, measured on the same
    images. Say why not otherwise (in the report)."""
    comparison = result.report["comparison"]
    methods = comparison["methods"]
    same_top1 = result.report["test"]["top1_changed_by_calibration"] == 0
    ece = methods[METHOD_ROWS[comparison["method"]]]["ece"]
    better = ece < methods["uncalibrated"]["ece"]
    mv = result.version
    if mv is None:
        return False
    current = registry.aliases(mv.name).get(alias)
    rival = registry.resolve(mv.name, current) if current and current != mv.version else None
    rival_ece = rival.manifest.metrics.ece if rival is not None else None
    if rival_ece is not None and _same_weights_calibrated(rival, mv) and rival_ece <= ece:
        better = False
        result.report["rival"] = f"{rival.ref}: ECE {rival_ece:.4f}"
    if same_top1 and better:
        registry.set_alias(mv.name, alias, mv.version)
        result.report["promoted"] = alias
        return True
    result.report["not_promoted"] = (
        f"top-1 unchanged: {same_top1}, ECE improved: {better}"
        + (f" (against {result.report['rival']})" if "rival" in result.report else "")
        + f"; {alias} left where it was"
    )
    return False


def _same_weights_calibrated(a: ModelVersion, b: ModelVersion) -> bool:
    """Both calibrated, with the same weights, measured on the same images."""
    ma, mb = a.manifest, b.manifest
    return (
        ma.calibration is not None
        and mb.calibration is not None
        and ma.files[WEIGHTS_FILE].sha256 == mb.files[WEIGHTS_FILE].sha256
        and ma.calibration.evaluated_on == mb.calibration.evaluated_on
    )
