"""The second half of loading a version: open the backend, warm it up (model thread).

:func:`load_model` touches the device, so the service only calls it on the model thread
(``Batcher.run_in_model_thread``), between batches; :func:`load_backend` does both halves
on the calling thread, for tools, benchmarks and tests.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from registry import ModelVersion, Registry
from service.dataplane.backends import Backend, open_backend
from service.dataplane.served import ServingModel
from service.errors import ModelLoadError
from service.lifecycle.autoselect import AUTO_MODES, open_fastest
from service.lifecycle.prepare import Prepared, prepare

log = logging.getLogger("seednet.loading")

#: Warm-up batch sizes: the first calls allocate and pick kernels; the last one also
#: measures the model time per image that admission control starts from.
WARMUP_BATCHES = (1, 8)


def _open(prepared: Prepared, cuda_graphs: bool) -> tuple[Backend, dict | None]:
    p = prepared
    if p.backend in AUTO_MODES:
        return open_fastest(
            p.version,
            p.candidates,
            p.device,
            cuda_graphs,
            threads=p.threads,
            recorded=p.recorded,
            remeasure=p.remeasure,
        )
    threads = p.threads.get(p.backend)
    backend = open_backend(
        p.backend, p.version, p.artefact, p.device, cuda_graphs, threads, density=p.density
    )
    return backend, None


def load_model(
    prepared: Prepared,
    cuda_graphs: bool = True,
    warmup_batches: tuple[int, ...] = WARMUP_BATCHES,
) -> ServingModel:
    """Open, capture and warm up. Touches the device: call it on the model thread."""
    mv = prepared.version
    classes = list(mv.manifest.class_names)
    t0 = time.perf_counter()
    try:
        be, auto = _open(prepared, cuda_graphs)
        dims: dict[str, tuple[int, ...]] = {}
        seconds_per_image = 0.0
        for n in warmup_batches:
            t = time.perf_counter()
            outputs = be.run(np.zeros((n, 3, 32, 32), dtype=np.uint8))
            seconds_per_image = (time.perf_counter() - t) / n
            probs, att = outputs.get("probabilities"), outputs.get("attention")
            if probs is None or att is None or probs.shape != (n, len(classes)) or att.ndim != 3:
                shapes = {k: v.shape for k, v in outputs.items()}
                raise ModelLoadError(f"{mv.ref}: unexpected outputs {shapes}")
            dims = {k: tuple(v.shape[1:]) for k, v in outputs.items()}
    except ModelLoadError:
        raise
    except Exception as exc:  # a broken artefact: say which version, keep serving
        raise ModelLoadError(f"{mv.ref} failed to load on {prepared.device}: {exc}") from exc
    log.info("warmed up %s in %.1fs", mv.ref, time.perf_counter() - t0)
    info = {"name": mv.name, "version": mv.version, "backend": be.name, "device": be.device}
    if auto is not None:
        info["auto"] = auto
    return ServingModel(mv, be, classes, info, dims, seconds_per_image)


def load_backend(
    registry: Registry,
    mv: ModelVersion,
    backend: str,
    device: str,
    materialize: bool = True,
    cuda_graphs: bool = True,
) -> Backend:
    """Verify and open ``mv`` on the calling thread (tools, benchmarks and tests)."""
    return _open(prepare(registry, mv, backend, device, materialize), cuda_graphs)[0]
