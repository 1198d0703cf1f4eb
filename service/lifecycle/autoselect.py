"""``SEEDNET_BACKEND=auto``: the fastest verified backend on this host, measured once.

Candidates (:func:`auto_candidates`): on the CPU TorchScript, ONNX Runtime and OpenVINO
(when installed), plus the int8 export when its accuracy gate passed (``auto``, not
``auto-fp32``); on a GPU TorchScript (CUDA graphs) and ONNX Runtime when its CUDA provider
is present. Each fp32 candidate is an export proven equal to eager within 1e-4 on the
golden set; the int8 one was measured within 0.5 points of fp32 accuracy on the test set.

:func:`open_fastest` (model thread) opens every candidate with the threads it will serve
with (``Settings.threads_for``), warms it up and times it in interleaved rounds at batch 1
and batch 8; the score is the time per image at batch 1 plus the time per image at batch
8 (latency for one client, throughput for many), the best of the rounds so that a
neighbour's burst does not decide. The losers are closed.

The choice stays put: it is recorded in the version's ``exports.json`` under the host's
fingerprint (CPU model and instruction sets, CPUs, threads, runtime versions, GPU), and a
later start on the same kind of host and version reuses it without measuring; it is
measured again only when asked (``SEEDNET_AUTO_REMEASURE``) or on another host. When it is
measured again, another backend replaces the recorded one only when it is clearly faster
(:data:`MARGIN`), so two runtimes within noise of each other do not trade places from one
start to the next (and with them the low bits of every answer). The choice and every
figure are logged and shown in ``/models`` and ``/health/ready`` (``serving.auto``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np

from registry import ModelVersion
from seednet.runtimes import openvino_available
from service.dataplane.backends import Backend, open_backend

log = logging.getLogger("seednet.autoselect")

AUTO = "auto"
AUTO_FP32 = "auto-fp32"
AUTO_MODES = (AUTO, AUTO_FP32)
AUTO_BATCHES = (1, 8)
ROUNDS = 2
#: A re-measured backend replaces the recorded choice only when its score is this much
#: lower (ONNX Runtime and OpenVINO are often within a few percent of each other).
MARGIN = 0.10
# (network config, device, candidates, threads) -> the measurement that chose, for later
# loads in this process (a promote of a version with the same network).
_MEASURED: dict[tuple, dict] = {}
# CPU flags that change which kernels a runtime runs (and so which backend is fastest).
_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "avx_vnni")


def auto_candidates(device: str) -> list[str]:
    """Full-precision backends ``auto`` may pick on ``device`` ("cpu" or "cuda"); the
    int8 export joins them on the CPU when its accuracy gate passed (``prepare``)."""
    if device == "cuda":
        import onnxruntime as ort

        cuda_ort = "CUDAExecutionProvider" in ort.get_available_providers()
        return ["torchscript", "onnx"] if cuda_ort else ["torchscript"]
    names = ["torchscript", "onnx"]
    if openvino_available():
        names.append("openvino")
    return names


def _cpu() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    have = set(value.split())
                    flags = [f for f in _FLAGS if f in have]
                    break
    except OSError:
        pass
    return model, flags


def _version(package: str) -> str | None:
    try:
        return package_version(package)
    except PackageNotFoundError:
        return None


def host_fingerprint(device: str, threads: Mapping[str, int]) -> dict:
    """What makes one backend faster than another here: plain data, recorded as it is."""
    model, flags = _cpu()
    host: dict = {
        "cpu": model,
        "flags": flags,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "device": device,
        "threads": dict(sorted(threads.items())),
        "runtimes": {
            p: _version(p) for p in ("torch", "onnxruntime", "onnxruntime-gpu", "openvino")
        },
    }
    if device == "cuda":
        import torch

        host["gpu"] = torch.cuda.get_device_name()
    return host


def host_key(host: Mapping) -> str:
    return hashlib.sha256(json.dumps(host, sort_keys=True).encode()).hexdigest()[:16]


def measure(backends: dict[str, Backend], batches=AUTO_BATCHES, rounds=ROUNDS) -> dict:
    """Best-of-``rounds`` milliseconds per call at each batch, per backend."""
    inputs = {b: np.zeros((b, 3, 32, 32), dtype=np.uint8) for b in batches}
    for be in backends.values():  # first calls allocate and pick kernels
        for x in inputs.values():
            be.run(x)
    best: dict[str, dict[int, float]] = {name: {} for name in backends}
    for _ in range(rounds):
        for name, be in backends.items():
            for b, x in inputs.items():
                t0 = time.perf_counter()
                be.run(x)
                ms = (time.perf_counter() - t0) * 1e3
                best[name][b] = min(best[name].get(b, ms), ms)
    return {
        name: {
            **{f"ms_batch_{b}": round(ms, 3) for b, ms in per.items()},
            "score_ms_per_image": round(sum(ms / b for b, ms in per.items()), 3),
        }
        for name, per in best.items()
    }


def choose(figures: Mapping[str, Mapping], recorded: str | None = None) -> str:
    """The fastest; the recorded choice stays unless another beats it by :data:`MARGIN`."""
    score = {name: f["score_ms_per_image"] for name, f in figures.items()}
    fastest = min(score, key=score.__getitem__)
    if recorded in score and score[fastest] > (1 - MARGIN) * score[recorded]:
        return recorded
    return fastest


def open_fastest(
    mv: ModelVersion,
    candidates: Sequence[tuple[str, Path]],
    device: str,
    cuda_graphs: bool = True,
    threads: Mapping[str, int] | None = None,
    recorded: Mapping | None = None,
    remeasure: bool = False,
) -> tuple[Backend, dict]:
    """Open the backend ``auto`` serves (model thread): the one ``recorded`` for this host
    (unless ``remeasure``), else the fastest of ``candidates`` measured now.

    Returns the backend and what ``serving.auto`` reports; ``measured`` says whether a
    new measurement should be recorded.
    """
    threads = dict(threads or {})
    names = tuple(name for name, _ in candidates)
    artefacts: dict[str, Path] = dict(candidates)
    host = host_fingerprint(device, {n: threads.get(n, 0) for n in names})
    base = {"candidates": list(names), "host": host, "host_key": host_key(host)}

    def opened(name: str) -> Backend:
        return open_backend(name, mv, artefacts[name], device, cuda_graphs, threads.get(name))

    if recorded and not remeasure and recorded.get("chosen") in artefacts:
        chosen = recorded["chosen"]
        log.info("auto: %s for %s (recorded for this host on %s)", chosen, mv.ref, device)
        return opened(chosen), {**recorded, **base, "chosen": chosen, "measured": False}
    key = (json.dumps(mv.manifest.model.config, sort_keys=True), device, names, str(threads))
    earlier = _MEASURED.get(key)
    if earlier is not None and not remeasure:
        chosen = earlier["chosen"]
        log.info("auto: %s for %s (measured for %s)", chosen, mv.ref, earlier["measured_for"])
        return opened(chosen), {**earlier, **base, "measured": True, "reused_from": "process"}
    t0 = time.perf_counter()
    backends = {}
    for name in names:
        be = opened(name)
        if be.device == device:  # e.g. ONNX Runtime without a working CUDA provider
            backends[name] = be
        else:
            log.warning("auto: %s runs on %s, not %s: not a candidate", name, be.device, device)
    figures = measure(backends)
    previous = recorded.get("chosen") if recorded else None
    chosen = choose(figures, previous)
    result = {
        **base,
        "chosen": chosen,
        "figures": figures,
        "measured_for": mv.ref,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - t0, 2),
        "measured": True,
    }
    log.info(
        "auto: %s for %s on %s, measured in %.1fs: %s",
        chosen,
        mv.ref,
        device,
        result["seconds"],
        _figures(figures),
    )
    _MEASURED[key] = result
    return backends[chosen], result


def _figures(figures: dict) -> str:
    return "; ".join(
        f"{name} "
        + ", ".join(
            f"{k.removeprefix('ms_')} {v:.1f} ms" for k, v in f.items() if k.startswith("ms_")
        )
        for name, f in figures.items()
    )
