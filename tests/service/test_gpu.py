"""GPU serving paths (CUDA graphs, ONNX Runtime's CUDA provider); skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from registry import Registry
from service.lifecycle.loading import load_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def golden(served_registry):
    reg = Registry(served_registry)
    mv = reg.resolve("tiny", "1")
    return reg, mv, load_file(str(mv.path / "golden.safetensors"))


@pytest.mark.parametrize("backend", ["torchscript", "eager", "onnx"])
def test_gpu_backends_match_the_recorded_eager_outputs(golden, backend):
    reg, mv, ref = golden
    be = load_backend(reg, mv, backend, "cuda", cuda_graphs=True)
    images = ref["images"].numpy()
    # 1, 5 and 32 go through the captured graphs (padded to 1, 8, 32); 40 and 64 do not
    for n in (1, 5, 32, 40, 64):
        out = be.run(images[:n])
        probs, att = out["probabilities"], out["attention"]
        assert probs.shape == (n, 10) and att.shape == (n, 7, 2)
        assert np.abs(probs - ref["probabilities"][:n].numpy()).max() < 1e-3
        assert np.abs(att - ref["attention"][:n].numpy()).max() < 1e-3


def test_cuda_graph_replays_do_not_leak_rows_between_calls(golden):
    reg, mv, ref = golden
    be = load_backend(reg, mv, "torchscript", "cuda", cuda_graphs=True)
    assert be.graphs is not None and be.graphs.graphs, "CUDA graphs were not captured"
    images = ref["images"].numpy()
    big = be.run(images[:8])["probabilities"]
    small, _ = be.run(images[3:4])  # padded into the size-1 graph after an 8-row call
    assert np.abs(small[0] - big[3]).max() < 1e-4
    # The same graph twice, fewer rows the second time: rows 5..7 of the size-8 graph's
    # input still hold the first call's images unless they are cleared. Rows are
    # independent in eval mode, so stale padding must not change the answer either way.
    recorded = ref["probabilities"].numpy()
    first, _ = be.run(images[8:16])  # fills the size-8 graph
    second, _ = be.run(images[16:21])  # 5 rows through the same size-8 graph
    assert first.shape == (8, 10) and second.shape == (5, 10)
    assert np.abs(first - recorded[8:16]).max() < 1e-3
    assert np.abs(second - recorded[16:21]).max() < 1e-3
    assert 8 in be.graphs.graphs  # both calls went through the one size-8 graph
