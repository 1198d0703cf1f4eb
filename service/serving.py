"""A registry version made ready to serve: verified, exported, opened, warmed up.

Loading has two halves so that nothing touches the device beside a running batch:

- :func:`prepare` (any thread): checks every file the model depends on against its
  recorded sha256 (the weights and golden set always, whatever the backend) and builds
  missing exports from the weights (CPU work, verified against the golden set);
- :meth:`ServingModel.load` (the model thread only): opens the backend on the device,
  captures CUDA graphs and warms up.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from registry import ModelVersion, Registry
from registry.manifest import EXPORT_FILES, GOLDEN_FILE, WEIGHTS_FILE
from seednet.device import DeviceError, resolve_device
from service.backends import BACKENDS, Backend, ModelLoadError, open_backend

log = logging.getLogger("seednet.serving")


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` proved: the verified artefact a backend will open."""

    version: ModelVersion
    backend: str
    artefact: Path
    device: str


def prepare(
    registry: Registry, mv: ModelVersion, backend: str, device: str, materialize: bool = True
) -> Prepared:
    """Verify ``mv`` and make sure the artefact of ``backend`` exists (off the model thread)."""
    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    try:
        device = resolve_device(device).type
    except DeviceError as exc:
        raise ModelLoadError(str(exc)) from None
    t0 = time.perf_counter()
    # The exports are derived from these: a version whose weights fail is never served.
    weights = registry.open_verified(mv, WEIGHTS_FILE)
    registry.open_verified(mv, GOLDEN_FILE)
    log.info("verified %s in %.1fs", mv.ref, time.perf_counter() - t0)
    if backend == "eager":
        return Prepared(mv, backend, weights, device)
    filename = EXPORT_FILES[backend]
    if filename not in registry.derived(mv).get("files", {}):
        if not materialize:
            raise ModelLoadError(
                f"{mv.ref} has no {filename}; run `python -m service.registry materialize "
                f"{mv.ref}` or set SEEDNET_MATERIALIZE_EXPORTS=true"
            )
        from seednet.export import materialize as build_exports

        t0 = time.perf_counter()
        build_exports(registry, mv)
        log.info("exports of %s built and verified in %.1fs", mv.ref, time.perf_counter() - t0)
    return Prepared(mv, backend, registry.open_verified(mv, filename), device)


@dataclass
class ServingModel:
    """A loaded, warmed-up model and what the API reports about it."""

    version: ModelVersion
    backend: Backend
    class_names: list[str]
    info: dict = field(default_factory=dict)
    #: Per-image shape of the attention output (blocks, branches), as the warm-up saw it.
    attention_dims: tuple[int, ...] = (7, 2)

    @classmethod
    def load(
        cls,
        prepared: Prepared,
        cuda_graphs: bool = True,
        warmup_batches: tuple[int, ...] = (1, 8),
    ) -> ServingModel:
        """Open, capture and warm up. Touches the device: call it on the model thread."""
        mv = prepared.version
        classes = list(mv.manifest.class_names)
        t0 = time.perf_counter()
        try:
            be = open_backend(prepared.backend, mv, prepared.artefact, prepared.device, cuda_graphs)
            attention_dims: tuple[int, ...] = cls.attention_dims  # (no warm-up: the default)
            for n in warmup_batches:  # first calls allocate and pick kernels: pay it now
                probs, att = be.run(np.zeros((n, 3, 32, 32), dtype=np.uint8))
                if probs.shape != (n, len(classes)) or att.ndim != 3:
                    raise ModelLoadError(
                        f"{mv.ref}: unexpected output shapes {probs.shape}, {att.shape}"
                    )
                attention_dims = tuple(att.shape[1:])
        except ModelLoadError:
            raise
        except Exception as exc:  # a broken artefact: say which version, keep serving
            raise ModelLoadError(f"{mv.ref} failed to load on {prepared.device}: {exc}") from exc
        log.info("warmed up %s in %.1fs", mv.ref, time.perf_counter() - t0)
        info = {"name": mv.name, "version": mv.version, "backend": be.name, "device": be.device}
        return cls(mv, be, classes, info, attention_dims)


def load_backend(
    registry: Registry,
    mv: ModelVersion,
    backend: str,
    device: str,
    materialize: bool = True,
    cuda_graphs: bool = True,
) -> Backend:
    """Verify and open ``mv`` on the calling thread (tools, benchmarks and tests)."""
    p = prepare(registry, mv, backend, device, materialize)
    return open_backend(p.backend, mv, p.artefact, p.device, cuda_graphs)
