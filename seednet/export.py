"""TorchScript and ONNX exports of the served graph, each proven before it is accepted.

The exported graph is :class:`seednet.graph.InferenceModel`: input ``images`` uint8
``[N, 3, 32, 32]`` (dynamic N, RGB), normalisation inside, outputs ``probabilities``
``[N, 10]`` (softmax) and ``attention`` ``[N, 7, 2]`` (every block has 2 branches, so
the attention of all blocks is one tensor, network order on axis 1). A calibrated
version's graph (:class:`seednet.graph.CalibratedInferenceModel`) divides the logits by
its temperature first (or by each image's, :mod:`seednet.temperature`) and has a third
output, ``ood_score`` fp32 ``[N]``.

Every export carries the graph's metadata (output names, temperature and its curve, OOD
score): ONNX as ``metadata_props`` key ``seednet``, TorchScript as the extra file
``seednet``. It is read back from the written files and must equal the graph's, so the
temperature in an export is the manifest's; the golden-set check proves the graph
computes with it.

An export is accepted only if: ``onnx.checker`` passes; an ONNX Runtime CPU session
(the served settings, ``seednet.runtimes``) runs it; TorchScript loads and runs in a
fresh process; and the outputs of both match the eager model on real images at batch 1
and 64 within ``TOLERANCE`` (fp32). A failing check raises :class:`ExportError` with the
figures, and nothing is written. When OpenVINO is installed, the ONNX export compiled by
OpenVINO is checked the same way; a failure there only leaves ``openvino`` out of the
verified backends (``verified_backends``), it does not refuse the other exports.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from registry import ModelVersion, Registry
from registry.manifest import EXPORT_FILES, GOLDEN_FILE, WEIGHTS_FILE
from seednet.errors import ExportError
from seednet.graph import (
    METADATA_KEY,
    OUTPUTS,
    InferenceModel,
    density_file_name,
    metadata_json,
    version_graph,
)
from seednet.runtimes import OpenVinoModel, openvino_available, ort_outputs, ort_session

TOLERANCE = 1e-4
CHECK_BATCHES = (1, 64)
REQUIRED = ("torchscript", "onnx")  # refused together; "openvino" is optional
# The ONNX exporter's libraries log every pass at INFO: hundreds of lines per export.
_CHATTY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo")


@dataclass
class Check:
    artefact: str
    batch: int
    max_abs_diff: dict[str, float]

    @property
    def passed(self) -> bool:
        return all(v <= TOLERANCE for v in self.max_abs_diff.values())


@dataclass
class ExportReport:
    files: dict[str, Path]
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Every required export checked and within tolerance (optional ones may fail)."""
        return set(REQUIRED) <= {c.artefact for c in self.checks} and all(
            c.passed for c in self.checks if c.artefact in REQUIRED
        )

    @property
    def verified(self) -> list[str]:
        return verified_backends({"checks": [vars(c) for c in self.checks]})

    def table(self) -> str:
        names = list(self.checks[0].max_abs_diff) if self.checks else list(OUTPUTS)
        rows = [f"{'artefact':<14}{'batch':>6}" + "".join(f"{n:>16}" for n in names) + "  result"]
        for c in self.checks:
            rows.append(
                f"{c.artefact:<14}{c.batch:>6}"
                + "".join(f"{c.max_abs_diff[n]:>16.2e}" for n in names)
                + f"  {'ok' if c.passed else 'FAIL'}"
            )
        rows += [f"note: {n}" for n in self.notes]
        rows += [f"wrote {p}" for p in self.files.values()]
        return "\n".join(rows)

    def to_info(self) -> dict:
        """What the registry records about the derived files."""
        outputs = {"probabilities": ["N", 10], "attention": ["N", "blocks", "L"]}
        if "ood_score" in self.metadata.get("outputs", []):
            outputs["ood_score"] = ["N"]
        return {
            "graph": {
                "input": {"name": "images", "dtype": "uint8", "shape": ["N", 3, 32, 32]},
                "outputs": outputs,
                "normalisation": "inside the graph",
                # read back from every written file and equal to the graph's own
                "metadata": self.metadata,
            },
            "checks": [
                {"artefact": c.artefact, "batch": c.batch, "max_abs_diff": c.max_abs_diff}
                for c in self.checks
            ],
            "verified": self.verified,
            "tolerance": TOLERANCE,
            "torch": torch.__version__,
            "runtimes": _runtime_versions(),
            "onnx_opset": _onnx_opset(self.files.get("model.onnx")),
        }


def verified_backends(info: dict) -> list[str]:
    """Backends of an exports.json whose every recorded check is within ``TOLERANCE``."""
    checks = info.get("checks", [])
    seen = {c.get("artefact") for c in checks}
    failed = {
        c.get("artefact")
        for c in checks
        if not all(v <= info.get("tolerance", TOLERANCE) for v in c["max_abs_diff"].values())
    }
    return sorted(a for a in seen - failed if isinstance(a, str))


def _runtime_versions() -> dict[str, str]:
    import onnxruntime

    versions = {"onnxruntime": onnxruntime.__version__}
    if openvino_available():
        import openvino

        versions["openvino"] = openvino.__version__
    return versions


def _onnx_opset(path: Path | None) -> int | None:
    if path is None or not path.exists():
        return None
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def eager_outputs(model: InferenceModel, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Every output of the eager graph by name."""
    with torch.no_grad():
        outputs = model(images)
    return {n: t.numpy() for n, t in zip(model.output_names, outputs, strict=True)}


def _diff(got: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    missing = sorted(set(reference) - set(got))
    if missing:
        raise ExportError(f"the export has no output {', '.join(missing)}")
    diffs = {}
    for k in reference:
        if got[k].shape != reference[k].shape:
            raise ExportError(f"output {k}: shape {got[k].shape}, expected {reference[k].shape}")
        diffs[k] = float(np.abs(got[k] - reference[k]).max())
    return diffs


def save_torchscript(model: InferenceModel, path: Path) -> None:
    # Scripting keeps the batch dimension dynamic; freezing folds the weights in.
    scripted = torch.jit.freeze(torch.jit.script(model))
    torch.jit.save(scripted, str(path), _extra_files={METADATA_KEY: metadata_json(model)})


def set_onnx_metadata(path: Path, metadata: str) -> None:
    """Write the graph's metadata into an ONNX file's ``metadata_props`` (replacing it)."""
    import onnx

    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=METADATA_KEY, value=metadata)
    onnx.save(model, str(path))


def export_metadata(path: Path) -> dict:
    """The metadata recorded in an export file ({} when it has none: an older export).

    TorchScript files are zip archives whose extra files live under ``<archive>/extra/``,
    so this reads one small member instead of loading the model.
    """
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        raw = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    else:
        with zipfile.ZipFile(path) as archive:
            member = next(
                (n for n in archive.namelist() if n.endswith(f"/extra/{METADATA_KEY}")), None
            )
            raw = archive.read(member).decode() if member else None
    return json.loads(raw) if raw else {}


def check_metadata(path: Path, expected: dict) -> None:
    """ExportError unless ``path`` records exactly ``expected`` (the graph's metadata)."""
    found = export_metadata(path)
    if found != expected:
        raise ExportError(
            f"{path.name} records metadata {found}, the graph it was built from {expected}"
        )


@contextlib.contextmanager
def _quiet_exporter():
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def save_onnx(model: InferenceModel, path: Path, example: torch.Tensor) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    # torch.onnx prints its progress on stdout: the start-up log stays one line per phase.
    with _quiet_exporter(), contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["images"],
            output_names=list(model.output_names),
            dynamic_shapes={"images": {0: batch}},
            dynamo=True,
            external_data=False,  # one self-contained file
            verbose=False,
        )
    set_onnx_metadata(path, metadata_json(model))


_FRESH_PROCESS_RUN = """
import json, sys, torch
from safetensors.torch import load_file, save_file
m = torch.jit.load(sys.argv[1], map_location="cpu")
images = load_file(sys.argv[2])["images"]
with torch.no_grad():
    outputs = m(images)
names = json.loads(sys.argv[4])
save_file({n: t.contiguous() for n, t in zip(names, outputs, strict=True)}, sys.argv[3])
"""


def _torchscript_in_fresh_process(
    path: Path, images: torch.Tensor, names: tuple[str, ...] = OUTPUTS
) -> dict[str, np.ndarray]:
    """Load and run the TorchScript file in a new interpreter (no training code imported)."""
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.safetensors", Path(tmp) / "out.safetensors"
        save_file({"images": images.contiguous()}, str(inp))
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                _FRESH_PROCESS_RUN,
                str(path),
                str(inp),
                str(out),
                json.dumps(list(names)),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            raise ExportError(f"TorchScript failed to load in a fresh process: {proc.stderr}")
        got = load_file(str(out))
    return {k: got[k].numpy() for k in names}


def _onnx_run(path: Path, images: torch.Tensor) -> dict[str, np.ndarray]:
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    return ort_outputs(ort_session(path, "cpu"), images.numpy())


def _openvino_run(path: Path, images: torch.Tensor) -> dict[str, np.ndarray]:
    return OpenVinoModel(path).run_all(images.numpy())


def export_and_check(model: InferenceModel, images: torch.Tensor, out_dir: Path) -> ExportReport:
    """Write model.ts and model.onnx into ``out_dir`` and prove them on ``images``.

    ``images`` needs at least ``max(CHECK_BATCHES)`` real uint8 images.
    """
    if images.shape[0] < max(CHECK_BATCHES) or images.dtype != torch.uint8:
        raise ExportError(
            f"need {max(CHECK_BATCHES)} uint8 check images, got "
            f"{tuple(images.shape)} {images.dtype}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    ts_name, onnx_name = EXPORT_FILES["torchscript"], EXPORT_FILES["onnx"]
    ts_path, onnx_path = out_dir / ts_name, out_dir / onnx_name
    save_torchscript(model, ts_path)
    save_onnx(model, onnx_path, images[:2])
    expected = json.loads(metadata_json(model))
    try:
        for path in (ts_path, onnx_path):
            check_metadata(path, expected)
    except ExportError:
        ts_path.unlink(missing_ok=True)
        onnx_path.unlink(missing_ok=True)
        raise
    report = ExportReport(files={ts_name: ts_path, onnx_name: onnx_path}, metadata=expected)
    names = model.output_names
    for batch in CHECK_BATCHES:
        x = images[:batch]
        reference = eager_outputs(model, x)
        ts_out = _torchscript_in_fresh_process(ts_path, x, names)
        report.checks.append(Check("torchscript", batch, _diff(ts_out, reference)))
        report.checks.append(Check("onnx", batch, _diff(_onnx_run(onnx_path, x), reference)))
        if openvino_available():
            try:
                got = _openvino_run(onnx_path, x)
            except Exception as exc:  # optional backend: say why, keep the others
                report.notes.append(f"openvino could not run the ONNX export: {exc}")
            else:
                report.checks.append(Check("openvino", batch, _diff(got, reference)))
    if not report.passed:
        ts_path.unlink(missing_ok=True)
        onnx_path.unlink(missing_ok=True)
        raise ExportError(
            f"export refused, outputs differ from eager beyond {TOLERANCE}:\n{report.table()}"
        )
    return report


def golden_set(model: InferenceModel, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference inputs and eager fp32 outputs (every output), stored with a version."""
    outputs = eager_outputs(model, images)
    return {"images": images.contiguous()} | {
        k: torch.from_numpy(v).contiguous() for k, v in outputs.items()
    }


def density_path(registry: Registry, mv: ModelVersion) -> Path | None:
    """The verified ``ood.safetensors`` of a version whose OOD score needs it, else None."""
    name = density_file_name(mv.manifest)
    return registry.open_verified(mv, name) if name else None


def served_graph(registry: Registry, mv: ModelVersion) -> InferenceModel:
    """The eager served graph of a registry version, from its verified weights (calibrated
    with the manifest's temperature when the version has one)."""
    return version_graph(
        mv.manifest, registry.open_verified(mv, WEIGHTS_FILE), density_path(registry, mv)
    )


def materialize(registry: Registry, mv: ModelVersion) -> ExportReport:
    """Rebuild a registry version's exports from its verified weights and register them.

    The version's golden set (real test images and the eager outputs recorded at
    publication) proves first that the weights load to the same model, then the exports
    are checked against eager on those images.
    """
    golden = load_file(str(registry.open_verified(mv, GOLDEN_FILE)))
    model = served_graph(registry, mv)
    recorded = {k: v.numpy() for k, v in golden.items() if k != "images"}
    if set(recorded) != set(model.output_names):
        raise ExportError(
            f"{mv.ref}: the golden set records {sorted(recorded)}, the manifest describes a "
            f"graph with outputs {list(model.output_names)}"
        )
    drift = _diff(eager_outputs(model, golden["images"]), recorded)
    if any(v > TOLERANCE for v in drift.values()):
        raise ExportError(
            f"{mv.ref}: the weights do not reproduce the recorded outputs (max abs diff {drift})"
        )
    # Built in the registry's own temp area: a process killed here leaves its scratch
    # where the next publish or `repair` removes it, not in the system temp folder.
    with registry.scratch(mv.name) as tmp:
        report = export_and_check(model, golden["images"], tmp)
        registry.add_derived(mv, report.files, report.to_info())
        report.files = {name: mv.path / name for name in report.files}
    report.notes.append(
        f"{mv.ref}: weights reproduce the golden outputs (max abs diff {max(drift.values()):.1e})"
    )
    return report


def check_version_metadata(registry: Registry, mv: ModelVersion) -> list[str]:
    """Problems (empty: none) where an export of ``mv`` records another temperature, curve
    or OOD score than its manifest: the derived TorchScript and ONNX files and the
    published int8 file, each read back from disk."""
    m = mv.manifest
    expected_t = m.calibration.temperature if m.calibration else None
    expected_curve = m.calibration.curve if m.calibration else None
    expected_ood = m.ood.score if m.ood else None
    names = list(registry.derived(mv).get("files", {}))
    if m.int8 is not None and m.int8.file:
        names.append(m.int8.file)
    problems = []
    for name in names:
        meta = export_metadata(registry.open_verified(mv, name))
        if meta.get("temperature") != expected_t or meta.get("ood_score") != expected_ood:
            problems.append(
                f"{name}: temperature {meta.get('temperature')}, ood_score "
                f"{meta.get('ood_score')}; the manifest says {expected_t}, {expected_ood}"
            )
        if meta.get("confidence_temperature") != expected_curve:
            problems.append(
                f"{name}: confidence temperature {meta.get('confidence_temperature')}; "
                f"the manifest says {expected_curve}"
            )
    return problems
