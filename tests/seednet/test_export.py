"""Exports (TorchScript, ONNX) against eager, and the registry's integrity guarantees."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from registry import IntegrityError, Registry
from seednet.graph import Normalize
from seednet.runtimes import openvino_available
from service.dataplane.images import ImageLimits, preprocess
from tests.conftest import REPO
from training.data import load_split


def test_published_exports_passed_parity_checks(served_registry):
    reg = Registry(served_registry)
    mv = reg.resolve("tiny", "1")
    info = reg.derived(mv)
    assert set(info["files"]) == {"model.ts", "model.onnx"}
    checks = {(c["artefact"], c["batch"]) for c in info["checks"]}
    artefacts = ["torchscript", "onnx"] + (["openvino"] if openvino_available() else [])
    assert checks == {(a, b) for a in artefacts for b in (1, 64)}
    assert info["verified"] == sorted(artefacts)
    for c in info["checks"]:
        assert max(c["max_abs_diff"].values()) <= 1e-4
    for name in ("model.ts", "model.onnx"):
        assert (mv.path / name).stat().st_size == info["files"][name]["size"] > 1000
    assert reg.verify(mv) == []


def test_export_cli_writes_checked_artefacts(tiny_run, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "training", "export", str(tiny_run), "--out", str(tmp_path / "exp")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    checked = 2 + openvino_available()  # torchscript, onnx (+ openvino), at batch 1 and 64
    assert r.stdout.count(" ok") == 2 * checked
    assert (tmp_path / "exp" / "model.onnx").exists() and (tmp_path / "exp" / "model.ts").exists()


def test_served_graph_matches_eager_preprocessing_and_model_on_real_jpegs(
    served_registry, cifar_dir
):
    """Service path (Pillow decode + graph normalisation) == training path (eager)."""
    import onnxruntime as ort

    from training.loading import load_model

    reg = Registry(served_registry)
    mv = reg.resolve("tiny", "1")
    files = sorted((cifar_dir / "test").glob("*/001[0-2].jpg"))
    served = np.stack([preprocess(p.read_bytes(), ImageLimits()).array for p in files])
    data = load_split(cifar_dir, "test", limit_per_class=13)
    picked = torch.cat([data.images[c * 13 + 10 : c * 13 + 13] for c in range(10)])
    assert np.array_equal(served, picked.numpy())  # same pixels by both paths

    model, _ = load_model(mv.path)
    with torch.no_grad():
        logits, atts = model(Normalize()(picked))
    eager_p, eager_a = logits.softmax(1).numpy(), torch.stack(atts, 1).numpy()
    ts = torch.jit.load(str(reg.open_verified(mv, "model.ts")))
    with torch.no_grad():
        ts_p, ts_a = (t.numpy() for t in ts(torch.from_numpy(served)))
    sess = ort.InferenceSession(
        str(reg.open_verified(mv, "model.onnx")), providers=["CPUExecutionProvider"]
    )
    onnx_p, onnx_a = sess.run(["probabilities", "attention"], {"images": served})
    for p, a in ((ts_p, ts_a), (onnx_p, onnx_a)):
        assert np.abs(p - eager_p).max() <= 1e-4
        assert np.abs(a - eager_a).max() <= 1e-4


@pytest.mark.parametrize(
    ("filename", "backend"),
    [
        ("weights.safetensors", "eager"),
        ("weights.safetensors", "torchscript"),  # the export is derived from these weights
        ("model.ts", "torchscript"),
        ("model.onnx", "onnx"),
    ],
)
def test_a_flipped_byte_fails_verify_and_loading(served_registry, tmp_path, filename, backend):
    import shutil

    from service.lifecycle.loading import load_backend

    root = tmp_path / "reg"
    shutil.copytree(served_registry, root)
    reg = Registry(root)
    mv = reg.resolve("tiny", "1")
    path = mv.path / filename
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = reg.verify(mv)
    assert problems and any(filename in p for p in problems)
    with pytest.raises(IntegrityError, match=filename):
        load_backend(reg, mv, backend, "cpu")
    r = subprocess.run(
        [sys.executable, "-m", "service.registry_cli", "--root", str(root), "verify"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and filename in r.stdout + r.stderr


def test_materialize_rebuilds_missing_exports(served_registry, tmp_path):
    import shutil

    root = tmp_path / "reg"
    shutil.copytree(served_registry, root)
    for f in ("model.ts", "model.onnx", "exports.json"):
        (root / "tiny" / "2" / f).unlink()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.registry_cli",
            "--root",
            str(root),
            "materialize",
            "tiny@2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    reg = Registry(root)
    assert reg.verify("tiny@2") == []
    assert (root / "tiny/2/model.ts").is_file() and (root / "tiny/2/model.onnx").is_file()
    assert json.loads((root / "tiny" / "2" / "exports.json").read_text())["tolerance"] == 1e-4
