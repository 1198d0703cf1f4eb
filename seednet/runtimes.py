"""How the ONNX export is run: ONNX Runtime and OpenVINO, configured in one place.

The export checks (``seednet.export``), the int8 gate (``seednet.quantize``), the
service's backends and the benchmarks all open sessions here, so what is verified on
the golden set is exactly what serves.

CPU settings, each kept because ``bench/cpu_backends_bench.py --ablation`` showed it
helps (figures in docs/benchmarks.md): ONNX Runtime with every graph optimisation
(``ORT_ENABLE_ALL``, which adds the NCHWc layout transform to the fusions), ``threads``
intra-op threads, one inter-op thread and sequential execution (the graph is a chain;
the parallel executor was slower), and intra-op threads that do not spin while waiting
(ONNX Runtime's default is to spin: on a host whose cores are shared with request
parsing, JPEG decoding, other workers or other programs, spinning took the cores from
them and doubled the median batch-1 time). OpenVINO with the LATENCY hint (one stream
using all ``threads``: the service runs one batch at a time) and fp32 inference
precision (OpenVINO would pick bf16 on CPUs that have it, which breaks the 1e-4 parity
with eager).

``threads`` defaults to :func:`default_threads`: torch's intra-op thread count, which is
the cores this process may use unless ``OMP_NUM_THREADS`` or ``torch.set_num_threads``
says otherwise, so every backend of a process uses the same number of cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

OUTPUTS = ("probabilities", "attention")
ORT_LEVELS = ("disable", "basic", "extended", "all")


def default_threads() -> int:
    """Threads per inference call: torch's setting (the available cores by default)."""
    return max(1, torch.get_num_threads())


def ort_session_options(
    threads: int | None = None,
    *,
    level: str = "all",
    inter_op: int | None = 1,
    sequential: bool = True,
    spinning: bool | None = False,
):
    """ONNX Runtime session options; the defaults are the service's (tuned) ones.

    ``threads=0``, ``inter_op=None`` and ``spinning=None`` leave ONNX Runtime's own
    choice (the benchmark's "library defaults" row uses them).
    """
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[level]
    so.intra_op_num_threads = default_threads() if threads is None else threads
    if inter_op is not None:
        so.inter_op_num_threads = inter_op
    so.execution_mode = (
        ort.ExecutionMode.ORT_SEQUENTIAL if sequential else ort.ExecutionMode.ORT_PARALLEL
    )
    if spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3  # warnings about unused initialisers etc. are not ours to fix
    return so


def ort_session(path: str | Path, device: str = "cpu", threads: int | None = None, **options):
    """An ONNX Runtime session: the CUDA provider on ``device="cuda"`` when present."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(
        str(path), sess_options=ort_session_options(threads, **options), providers=providers
    )


def ort_run(session, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``probabilities`` and ``attention``, by name (also from a calibrated export, whose
    third output :func:`ort_outputs` returns)."""
    probs, att = session.run(list(OUTPUTS), {"images": images})
    return probs, att


def ort_outputs(session, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of the export by name: ``probabilities``, ``attention`` and, for a
    calibrated version, ``ood_score``."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"images": images}), strict=True))


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVinoModel:
    """The ONNX export compiled by OpenVINO for the CPU (dynamic batch, one request)."""

    def __init__(self, path: str | Path, threads: int | None = None, hint: str = "LATENCY") -> None:
        import openvino as ov

        core = ov.Core()
        config = {
            "PERFORMANCE_HINT": hint,
            "INFERENCE_NUM_THREADS": default_threads() if threads is None else threads,
            "INFERENCE_PRECISION_HINT": "f32",
        }
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self._outputs = [self.compiled.output(name) for name in OUTPUTS]
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # share_outputs=False: the arrays are copies, not views of the request's buffers,
        # so the next batch cannot overwrite an answer that is still being serialised.
        result = self.request.infer({"images": images}, share_outputs=False)
        return result[self._outputs[0]], result[self._outputs[1]]

    def run_all(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every output by name (copies, as :meth:`run`)."""
        result = self.request.infer({"images": images}, share_outputs=False)
        return {name: result[self.compiled.output(name)] for name in self.output_names}
