"""The tuned ONNX Runtime session and OpenVINO: the same answers as the golden set."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from registry import Registry
from seednet.export import verified_backends
from seednet.runtimes import OpenVinoModel, openvino_available, ort_run, ort_session
from service.dataplane.backends import BACKENDS
from service.lifecycle.loading import load_backend

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tiny(served_registry):
    reg = Registry(served_registry)
    mv = reg.resolve("tiny", "1")
    return reg, mv, load_file(str(reg.open_verified(mv, "golden.safetensors")))


def _assert_matches_golden(probs, att, golden, n):
    assert np.abs(probs - golden["probabilities"][:n]).max() <= TOLERANCE
    assert np.abs(att - golden["attention"][:n]).max() <= TOLERANCE


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_tuned_onnx_runtime_session_matches_the_golden_set(tiny, batch):
    reg, mv, golden = tiny
    session = ort_session(reg.open_verified(mv, "model.onnx"), "cpu")
    options = session.get_session_options()
    assert options.inter_op_num_threads == 1
    assert str(options.execution_mode).endswith("ORT_SEQUENTIAL")
    assert str(options.graph_optimization_level).endswith("ORT_ENABLE_ALL")
    _assert_matches_golden(*ort_run(session, golden["images"][:batch]), golden, batch)


@pytest.mark.skipif(not openvino_available(), reason="openvino is not installed")
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_openvino_matches_the_golden_set(tiny, batch):
    reg, mv, golden = tiny
    model = OpenVinoModel(reg.open_verified(mv, "model.onnx"))
    assert "float32" in str(model.compiled.get_property("INFERENCE_PRECISION_HINT"))
    _assert_matches_golden(*model.run(golden["images"][:batch]), golden, batch)


@pytest.mark.skipif(not openvino_available(), reason="openvino is not installed")
def test_openvino_outputs_are_copies_not_views_of_the_request_buffers(tiny):
    reg, mv, golden = tiny
    be = load_backend(reg, mv, "openvino", "cpu")
    first = be.run(golden["images"][:4])["probabilities"]
    kept = first.copy()
    be.run(golden["images"][4:8])  # the next batch must not overwrite the first answer
    assert np.array_equal(first, kept)


@pytest.mark.parametrize("backend", ["torchscript", "onnx", "openvino", "eager"])
def test_every_fp32_backend_serves_the_golden_answers(tiny, backend):
    if backend == "openvino" and not openvino_available():
        pytest.skip("openvino is not installed")
    reg, mv, golden = tiny
    be = load_backend(reg, mv, backend, "cpu")
    assert be.name == backend and be.device == "cpu"
    out = be.run(golden["images"])
    _assert_matches_golden(out["probabilities"], out["attention"], golden, 64)


def test_a_failed_optional_check_leaves_only_that_backend_unverified():
    info = {
        "tolerance": 1e-4,
        "checks": [
            {"artefact": "onnx", "batch": 1, "max_abs_diff": {"probabilities": 1e-7}},
            {"artefact": "openvino", "batch": 1, "max_abs_diff": {"probabilities": 1e-7}},
            {"artefact": "openvino", "batch": 64, "max_abs_diff": {"probabilities": 3e-3}},
        ],
    }
    assert verified_backends(info) == ["onnx"]
    assert "onnx-int8" in BACKENDS
