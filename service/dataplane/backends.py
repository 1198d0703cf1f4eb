"""Model backends: TorchScript, ONNX Runtime (fp32, int8), OpenVINO and eager PyTorch.

Every backend takes uint8 images ``[N, 3, 32, 32]`` and returns the graph's outputs by
name: ``probabilities [N, classes]``, ``attention [N, blocks, L]`` and whatever else a
version's graph adds; normalisation is inside the graph. Opening a backend touches the
device, so the service only ever does it on the model thread (see
``service.dataplane.batching``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from registry import ModelVersion
from seednet.graph import CALIBRATED_OUTPUTS
from seednet.runtimes import OpenVinoModel, ort_session
from service.errors import ModelLoadError

log = logging.getLogger("seednet.backends")

#: A forward pass's outputs by name (``probabilities``, ``attention``, ...), batch first.
Outputs = dict[str, np.ndarray]
# fp32 backends answer like eager within 1e-4 (proven on the golden set); "onnx-int8" is
# the quantised export, gated on test accuracy instead, and served only when named.
FP32_BACKENDS = ("torchscript", "onnx", "openvino", "eager")
BACKENDS = (*FP32_BACKENDS, "onnx-int8")
#: Where each backend's computation runs (what the inference protocol's metadata calls the
#: platform, in Triton's names): every value ``SEEDNET_BACKEND`` accepts has one.
PLATFORMS: dict[str, str] = {
    "torchscript": "pytorch_libtorch",
    "eager": "pytorch_libtorch",
    "onnx": "onnxruntime_onnx",
    "onnx-int8": "onnxruntime_onnx",
    "openvino": "openvino",
}


class Backend(Protocol):
    name: str
    device: str

    def run(self, images: np.ndarray) -> Outputs: ...


def _named(values) -> Outputs:
    """A TorchScript/eager graph's output tuple by name (the export's output order:
    ``probabilities``, ``attention``, then ``ood_score`` in calibrated versions)."""
    if len(values) > len(CALIBRATED_OUTPUTS):
        raise ModelLoadError(
            f"the graph returns {len(values)} outputs; known: {CALIBRATED_OUTPUTS}"
        )
    return {n: v.float().cpu().numpy() for n, v in zip(CALIBRATED_OUTPUTS, values, strict=False)}


class _CudaGraphs:
    """Replay captured CUDA graphs for small batches (padded up to a power of two).

    Launch overhead dominates one small image on a GPU; a graph replays the whole
    forward pass as one launch. Batches above ``max_batch`` run normally.
    """

    def __init__(
        self, fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], max_batch: int = 32
    ) -> None:
        self.fn = fn
        self.sizes = [1 << i for i in range(max_batch.bit_length()) if (1 << i) <= max_batch]
        self.graphs: dict[int, tuple] = {}

    def capture(self) -> None:
        for size in self.sizes:
            static_in = torch.zeros((size, 3, 32, 32), dtype=torch.uint8, device="cuda")
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(3):
                    self.fn(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.inference_mode():
                static_out = self.fn(static_in)
            self.graphs[size] = (graph, static_in, static_out)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        n = x.shape[0]
        size = next((s for s in self.sizes if s >= n), None)
        if size is None or size not in self.graphs:
            return None
        graph, static_in, static_out = self.graphs[size]
        static_in.zero_()
        static_in[:n].copy_(x)
        graph.replay()
        return tuple(t[:n].clone() for t in static_out)


class TorchBackend:
    """A TorchScript module (or an eager ``InferenceModel``) on CPU or CUDA."""

    def __init__(
        self,
        module: torch.nn.Module,
        name: str,
        device: str,
        cuda_graphs: bool = False,
        threads: int | None = None,
    ) -> None:
        self.name = name
        self.device = device
        # torch's intra-op thread count is one per process: set it before each call when
        # another backend (auto measuring its candidates) changed it
        self.threads = threads if device == "cpu" else None
        self.module = module.to(device).eval()
        self.graphs: _CudaGraphs | None = None
        if device == "cuda" and cuda_graphs:
            try:
                self.graphs = _CudaGraphs(self.module)
                self.graphs.capture()
            except Exception as exc:  # the plain path still works; say why graphs are off
                log.warning("CUDA graphs disabled: %s", exc)
                self.graphs = None

    def run(self, images: np.ndarray) -> Outputs:
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        x = torch.from_numpy(images).to(self.device, non_blocking=True)
        with torch.inference_mode():
            out = self.graphs(x) if self.graphs is not None else None
            return _named(out if out is not None else self.module(x))


class OnnxBackend:
    """ONNX Runtime: the CUDA execution provider on GPU, else the CPU one.

    Session settings (graph optimisation level, threads, execution mode) are
    ``seednet.runtimes``', the ones the export was verified with.
    """

    def __init__(
        self, path: str, device: str, name: str = "onnx", threads: int | None = None
    ) -> None:
        self.name = name
        self.session = ort_session(path, device, threads)
        self.device = "cuda" if self.session.get_providers()[0].startswith("CUDA") else "cpu"

        self._names = [o.name for o in self.session.get_outputs()]

    def run(self, images: np.ndarray) -> Outputs:
        return dict(
            zip(self._names, self.session.run(self._names, {"images": images}), strict=True)
        )


class OpenVinoBackend:
    """The ONNX export compiled by OpenVINO for the CPU (LATENCY hint, fp32)."""

    name = "openvino"
    device = "cpu"

    def __init__(self, path: str, threads: int | None = None) -> None:
        self.model = OpenVinoModel(path, threads)

    def run(self, images: np.ndarray) -> Outputs:
        # share_outputs=False: copies, not views of the request's buffers, so the next
        # batch cannot overwrite an answer that is still being serialised.
        result = self.model.request.infer({"images": images}, share_outputs=False)
        return {out.get_any_name(): result[out] for out in self.model.compiled.outputs}


def open_backend(
    kind: str,
    mv: ModelVersion,
    path: Path,
    device: str,
    cuda_graphs: bool = True,
    threads: int | None = None,
    density: Path | None = None,
) -> Backend:
    """Open a verified artefact (``path``) of ``mv`` on ``device`` ("cpu" or "cuda").

    ``threads``: intra-op threads of the runtime on the CPU (default: torch's count).
    ``density``: for ``eager``, the version's verified ``ood.safetensors`` when its OOD
    score needs it (the exports hold it as constants).
    """
    if kind in ("onnx", "onnx-int8"):
        return OnnxBackend(str(path), device, kind, threads)
    if kind == "openvino":
        if device != "cpu":
            raise ModelLoadError("the openvino backend runs on the CPU only (SEEDNET_DEVICE=cpu)")
        try:
            return OpenVinoBackend(str(path), threads)
        except ImportError:
            raise ModelLoadError(
                "the openvino backend needs the openvino package (pip install openvino)"
            ) from None
    if kind == "torchscript":
        module = torch.jit.load(str(path), map_location=device)
        return TorchBackend(module, "torchscript", device, cuda_graphs, threads)
    if kind == "eager":
        from seednet.graph import version_graph  # the version's graph: its temperature too

        graph = version_graph(mv.manifest, path, density)
        return TorchBackend(graph, "eager", device, cuda_graphs, threads)
    raise ModelLoadError(f"unknown backend {kind!r}; expected one of {', '.join(BACKENDS)}")
