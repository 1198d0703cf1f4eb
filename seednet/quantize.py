"""The int8 export: static post-training quantisation of the ONNX export, gated on accuracy.

:func:`quantize_version` takes a registry version whose ``model.onnx`` is verified,
calibration images (uint8 ``[N, 3, 32, 32]``, from the *training* split: the caller
loads them, this module never reads a data set) and a labelled test set, and:

1. quantises with ONNX Runtime's tools (``quantize_static``, QDQ format, per-channel
   int8 weights, uint8 activations, MinMax calibration on the given images);
2. checks the int8 graph on the version's golden set (it runs, shapes match; the
   largest difference from the recorded fp32 outputs and the top-1 agreement are
   recorded: int8 cannot match fp32 within 1e-4, so its gate is accuracy);
3. measures fp32 (the verified ``model.onnx``) and int8 accuracy on the test set, in
   the same ONNX Runtime session settings that serve them;
4. refuses the export (:class:`QuantizationRefused`, with both figures; nothing is
   written) when int8 is more than ``max_drop`` points below fp32; otherwise records
   ``model.int8.onnx`` and both accuracies in the version's exports.json.

Calibration and test images come from the caller because a serving host has only the
registry: the int8 export is built by ``python -m training quantize NAME@VERSION --data
DIR``, never at start-up, and served only when ``SEEDNET_BACKEND=onnx-int8`` asks for it.

:func:`build_int8` is the registry-free core (quantise, golden check, gate): a calibrated
version's int8 export is built by it *before* publication and published as a version file
with its gate in the manifest (``training calibrate``); :func:`quantize_version` records it
as a derived file of an already published version.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from registry import ModelVersion, Registry
from registry.manifest import EXPORT_FILES, GOLDEN_FILE
from seednet.export import ExportError, check_metadata, export_metadata, set_onnx_metadata
from seednet.runtimes import ort_outputs, ort_run, ort_session

MAX_DROP_POINTS = 0.5  # an int8 export more than this many points below fp32 is refused
DERIVED_INT8_FILE = EXPORT_FILES["onnx-int8"]  # older versions (PUBLISHED_INT8_FILE: newer)
Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class QuantizationRefused(ExportError):
    """The int8 export lost too much accuracy; the message has both figures."""

    code = "int8_refused"


@dataclass
class Int8Report:
    fp32_accuracy: float
    int8_accuracy: float
    test_images: int
    calibration_images: int
    golden: dict
    max_drop_points: float
    seconds: float

    @property
    def drop_points(self) -> float:
        return (self.fp32_accuracy - self.int8_accuracy) * 100

    @property
    def passed(self) -> bool:
        # accuracies are counts over the same images: 1e-9 absorbs float noise only, so
        # "within 0.5 point" is <= 0.5 as written, not < 0.5 by rounding luck
        return self.drop_points <= self.max_drop_points + 1e-9

    def table(self) -> str:
        return "\n".join(
            [
                f"{'export':<18}{'test accuracy':>14}   ({self.test_images} test images)",
                f"{'model.onnx fp32':<18}{self.fp32_accuracy * 100:>13.2f}%",
                f"{'model.int8.onnx':<18}{self.int8_accuracy * 100:>13.2f}%",
                f"drop {self.drop_points:+.2f} points (limit {self.max_drop_points:.2f}); "
                f"golden set: top-1 agreement {self.golden['top1_agreement'] * 100:.1f}%, "
                f"max abs diff probabilities {self.golden['max_abs_diff']['probabilities']:.3f}",
            ]
        )


class _Calibration:
    """ONNX Runtime's CalibrationDataReader over a uint8 array, in small batches."""

    def __init__(self, images: np.ndarray, batch: int = 32) -> None:
        self._batches = iter([images[i : i + batch] for i in range(0, len(images), batch)])

    def get_next(self) -> dict | None:
        x = next(self._batches, None)
        return None if x is None else {"images": np.ascontiguousarray(x)}

    def rewind(self) -> None:  # pragma: no cover - only some calibrators call it
        raise NotImplementedError


# Ops that only reshape, scale or normalise what they are given: between the last compute
# op (a Conv, Gemm or MatMul) and an output they stay float, so the outputs are not rounded
# to uint8 steps: the softmax, and in a calibrated graph the division by the temperature
# (with a confidence temperature, its curve: seednet.temperature, a Relu among them) and
# the log-sum-exp of ``ood_score``. The walk back from an output stops at the first op not
# listed, so the network's own Relus (before its last Gemm) are never reached.
_TAIL_OPS = {
    "Relu",
    "Softmax",
    "Concat",
    "Unsqueeze",
    "Squeeze",
    "Reshape",
    "Flatten",
    "Identity",
    "Cast",
    "Div",
    "Mul",
    "Neg",
    "Sub",
    "Add",
    "Exp",
    "Log",
    "ReduceMax",
    "ReduceSum",
    "ReduceLogSumExp",
}


# The ``density+energy`` score (seednet.ood) reads features through matrix products whose
# int8 rounding would move a score compared with a float threshold: from ``ood_score``
# back to the convolutions (the classifier's two small layers included), all stays float.
_OOD_OPS = _TAIL_OPS | {
    "MatMul",
    "Gemm",
    "ReduceMean",
    "GlobalAveragePool",
    "Transpose",
    "Pow",
    "Shape",
    "Gather",
    "Expand",
}


def float_tail(model) -> list[str]:
    """Nodes kept in float: every Softmax (probabilities and the attention weights, so
    they still sum to 1), the tail ops between the last compute ops and the outputs, and
    the whole ``ood_score`` path down to the convolutions (:data:`_OOD_OPS`)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    keep = {node.name for node in model.graph.node if node.op_type == "Softmax"}
    for output in model.graph.output:
        ops = _OOD_OPS if output.name == "ood_score" else _TAIL_OPS
        todo, seen = [output.name], set()
        while todo:
            node = producer.get(todo.pop())
            if node is None or node.name in seen or node.op_type not in ops:
                continue
            seen.add(node.name)
            keep.add(node.name)
            todo += list(node.input)
    return sorted(keep)


def quantize_onnx(src: Path, dest: Path, calibration: np.ndarray) -> None:
    """Static QDQ quantisation of ``src``: per-channel int8 weights, uint8 activations;
    the softmax outputs (probabilities, attention) stay float (:func:`float_tail`).

    Weights use 7 bits (``reduce_range``): on a CPU without VNNI (AVX2 only), ONNX
    Runtime's uint8 x int8 kernels add pairs of products in 16 bits, which saturate with
    full-range weights. Measured on seednet@1 on such a CPU (2026-12-02, 1,000 test images):
    8-bit weights 90.7 % against 92.2 % fp32, 7-bit weights 92.4 %, at the same speed
    (signed 8-bit activations were as accurate but no faster than fp32 there)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _check_images(calibration, "calibration")
    with tempfile.TemporaryDirectory(dir=Path(dest).parent) as tmp:  # beside dest
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and graph fusions first, as ONNX Runtime's docs recommend. Its
        # symbolic shape inference gives up on the density+energy score's graph (a value
        # after ReduceLogSumExp has no shape for it); ONNX's own inference is enough for a
        # graph whose only free dimension is the batch.
        try:
            quant_pre_process(str(src), str(prepared))
        except TypeError:
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        import onnx

        keep_float = float_tail(onnx.load(str(prepared)))
        quantize_static(
            str(prepared),
            str(dest),
            _Calibration(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=keep_float,
            reduce_range=True,
        )


def accuracy(run: Runner, images: np.ndarray, labels: np.ndarray, batch: int = 250) -> float:
    """Top-1 accuracy (fraction) of ``run`` on uint8 ``images``."""
    correct = 0
    for i in range(0, len(images), batch):
        probs, _ = run(np.ascontiguousarray(images[i : i + batch]))
        correct += int((probs.argmax(1) == labels[i : i + batch]).sum())
    return correct / len(images)


def _check_images(images: np.ndarray, what: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (3, 32, 32):
        raise ExportError(
            f"{what} images must be uint8 [N, 3, 32, 32], got {images.dtype} {images.shape}"
        )
    if len(images) == 0:
        raise ExportError(f"no {what} images")


def _golden_check(session, golden: dict[str, np.ndarray]) -> dict:
    """The int8 export on the golden set: every recorded output present with its shape,
    how far from fp32 it is (recorded; int8 cannot match within 1e-4) and top-1 agreement."""
    got = ort_outputs(session, golden["images"])
    recorded = {k: v for k, v in golden.items() if k != "images"}
    if set(got) != set(recorded):
        raise ExportError(f"int8 outputs {sorted(got)} differ from fp32's {sorted(recorded)}")
    for k, v in recorded.items():
        if got[k].shape != v.shape:
            raise ExportError(f"int8 output {k} has shape {got[k].shape}, fp32 {v.shape}")
    probs = got["probabilities"]
    return {
        "images": len(golden["images"]),
        "top1_agreement": float((probs.argmax(1) == golden["probabilities"].argmax(1)).mean()),
        "max_abs_diff": {k: float(np.abs(got[k] - v).max()) for k, v in recorded.items()},
    }


def build_int8(
    fp32_path: Path,
    dest: Path,
    calibration: np.ndarray,
    golden: dict[str, np.ndarray],
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    max_drop_points: float = MAX_DROP_POINTS,
    threads: int | None = None,
    fp32_accuracy: float | None = None,
) -> Int8Report:
    """Quantise the verified fp32 ONNX export ``fp32_path`` into ``dest``, check it on the
    golden set (outputs, shapes, and the fp32 file's metadata, temperature included) and
    measure both accuracies on the test set. ``dest`` is written whether or not the gate
    passes: the caller decides what to keep (``report.passed``).

    ``fp32_accuracy``: the fp32 figure when the caller already measured it with ONNX Runtime
    on the same images (skips a second fp32 pass).
    """
    t0 = time.perf_counter()
    _check_images(test_images, "test")
    labels = np.asarray(test_labels)
    quantize_onnx(fp32_path, dest, calibration)
    metadata = export_metadata(fp32_path)
    if metadata:  # the graph's metadata travels with it (quantize_static drops it)
        set_onnx_metadata(dest, json.dumps(metadata, sort_keys=True))
        check_metadata(dest, metadata)
    int8 = ort_session(dest, "cpu", threads)
    golden_check = _golden_check(int8, golden)
    if fp32_accuracy is None:
        fp32 = ort_session(fp32_path, "cpu", threads)
        fp32_accuracy = accuracy(lambda x: ort_run(fp32, x), test_images, labels)
    acc_int8 = accuracy(lambda x: ort_run(int8, x), test_images, labels)
    return Int8Report(
        fp32_accuracy=fp32_accuracy,
        int8_accuracy=acc_int8,
        test_images=len(test_images),
        calibration_images=len(calibration),
        golden=golden_check,
        max_drop_points=max_drop_points,
        seconds=time.perf_counter() - t0,
    )


def int8_details(report: Int8Report, data: dict | None = None) -> dict:
    """How the int8 export was built and checked (exports.json or the manifest)."""
    return {
        "tool": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "weights": "int8 (7-bit range), per channel",
        "activations": "uint8, per tensor",
        "calibration": "MinMax",
        "calibration_images": report.calibration_images,
        "data": data or {},
        "golden": report.golden,
        "max_drop_points": report.max_drop_points,
        "drop_points": report.drop_points,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def quantize_version(
    registry: Registry,
    mv: ModelVersion,
    calibration: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    max_drop_points: float = MAX_DROP_POINTS,
    data: dict | None = None,
    threads: int | None = None,
) -> Int8Report:
    """Build, check and gate ``model.int8.onnx`` for ``mv``; record it when accepted.

    ``data`` describes where the calibration and test images came from (recorded).
    """
    _check_images(test_images, "test")
    if mv.manifest.int8 is not None:
        raise ExportError(
            f"{mv.ref} was published with its int8 export and gate (manifest.int8); "
            "it is not rebuilt"
        )
    fp32_path = registry.open_verified(mv, EXPORT_FILES["onnx"])
    golden = load_file(str(registry.open_verified(mv, GOLDEN_FILE)))
    with registry.scratch(mv.name) as tmp:  # the registry's temp area: cleaned if killed
        int8_path = tmp / DERIVED_INT8_FILE
        report = build_int8(
            fp32_path,
            int8_path,
            calibration,
            golden,
            test_images,
            test_labels,
            max_drop_points=max_drop_points,
            threads=threads,
        )
        acc_fp32, acc_int8 = report.fp32_accuracy, report.int8_accuracy
        if not report.passed:
            raise QuantizationRefused(
                f"{mv.ref}: int8 export refused: test accuracy {acc_int8 * 100:.2f}% vs fp32 "
                f"{acc_fp32 * 100:.2f}% on {len(test_images)} images, "
                f"{report.drop_points:.2f} points lower (limit {max_drop_points:.2f})"
            )
        recorded = registry.derived(mv).get("accuracy", {})
        measured = {"test_images": len(test_images), "data": data or {}}
        info = {
            "accuracy": {
                **recorded,
                "onnx": {**measured, "accuracy": acc_fp32},
                "onnx-int8": {**measured, "accuracy": acc_int8},
            },
            "int8": int8_details(report, data),
        }
        registry.add_derived(mv, {DERIVED_INT8_FILE: int8_path}, info)
    return report
