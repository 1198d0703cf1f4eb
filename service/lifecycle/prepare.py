"""The first half of loading a registry version: verified and exported (any thread).

Loading has two halves so that nothing touches the device beside a running batch:

- :func:`prepare` (this module, any thread): checks every file the model depends on
  against its recorded sha256 (the weights and golden set always, whatever the backend)
  and builds missing exports from the weights (CPU work, verified against the golden set);
- :func:`service.lifecycle.loading.load_model` (the model thread only): opens the backend
  on the device, captures CUDA graphs and warms up.

``backend="auto"`` prepares every verified export the device can run (the int8 one only
when its accuracy gate passed; ``auto-fp32`` never) and lets
:mod:`service.lifecycle.autoselect` pick the one recorded for this host, or time them at
load and keep the fastest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from registry import ModelVersion, Registry
from registry.manifest import EXPORT_FILES, GOLDEN_FILE, WEIGHTS_FILE
from seednet.device import DeviceError, resolve_device
from seednet.export import check_version_metadata, density_path, verified_backends
from seednet.runtimes import openvino_available
from service.dataplane.backends import BACKENDS
from service.errors import ModelLoadError
from service.lifecycle.autoselect import (
    AUTO,
    AUTO_MODES,
    auto_candidates,
    host_fingerprint,
    host_key,
)

log = logging.getLogger("seednet.serving")


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` proved: the verified artefact a backend will open.

    With ``backend`` ``auto``/``auto-fp32``, ``candidates`` holds every verified (backend,
    artefact) to measure, ``artefact`` the first of them, and ``recorded`` the choice
    recorded for this host and version, if any. ``threads``: each backend's threads.
    """

    version: ModelVersion
    backend: str
    artefact: Path
    device: str
    candidates: tuple[tuple[str, Path], ...] = ()
    threads: Mapping[str, int] = field(default_factory=dict)
    recorded: Mapping | None = None
    remeasure: bool = False
    density: Path | None = None  # the eager graph's ood.safetensors (density+energy only)


def prepare(
    registry: Registry,
    mv: ModelVersion,
    backend: str,
    device: str,
    materialize: bool = True,
    threads: Callable[[str], int] | None = None,
    remeasure: bool = False,
) -> Prepared:
    """Verify ``mv`` and make sure the artefact of ``backend`` exists (off the model thread).

    ``threads(backend)`` gives a backend's intra-op threads on the CPU (None: the
    runtimes' defaults).
    """
    if backend not in (*BACKENDS, *AUTO_MODES):
        raise ModelLoadError(
            f"unknown backend {backend!r}; expected one of {', '.join((*AUTO_MODES, *BACKENDS))}"
        )
    try:
        device = resolve_device(device).type
    except DeviceError as exc:
        raise ModelLoadError(str(exc)) from None
    t0 = time.perf_counter()
    # The exports are derived from these: a version whose weights fail is never served.
    weights = registry.open_verified(mv, WEIGHTS_FILE)
    registry.open_verified(mv, GOLDEN_FILE)
    log.info("verified %s in %.1fs", mv.ref, time.perf_counter() - t0)

    def threads_of(names) -> dict[str, int]:
        return {n: threads(n) for n in names} if threads is not None and device == "cpu" else {}

    if backend == "eager":
        density = density_path(registry, mv)
        return Prepared(
            mv, backend, weights, device, threads=threads_of([backend]), density=density
        )
    if backend in ("openvino", "onnx-int8") and device != "cpu":
        raise ModelLoadError(
            f"the {backend} backend runs on the CPU only (it was verified there); "
            "set SEEDNET_DEVICE=cpu"
        )
    if backend == "onnx-int8":
        return Prepared(
            mv, backend, _int8_artefact(registry, mv), device, threads=threads_of([backend])
        )
    if backend == "openvino" and not openvino_available():
        raise ModelLoadError("the openvino backend needs the openvino package")
    int8 = _int8_gate(registry, mv) if backend == AUTO and device == "cpu" else None
    wanted = auto_candidates(device) if backend in AUTO_MODES else [backend]
    if not set(wanted) <= _checked(registry, mv) and materialize:
        from seednet.export import materialize as build_exports

        t0 = time.perf_counter()
        build_exports(registry, mv)
        log.info("exports of %s built and verified in %.1fs", mv.ref, time.perf_counter() - t0)
    verified = _verified(registry, mv)
    problems = check_version_metadata(registry, mv)
    if problems:  # an export of another temperature than the manifest's: never serve it
        raise ModelLoadError(f"{mv.ref}: its exports disagree with its manifest: {problems}")
    ready = [b for b in wanted if b in verified]
    if not ready:
        hint = (
            f"run `python -m service.registry_cli materialize {mv.ref}` or set "
            "SEEDNET_MATERIALIZE_EXPORTS=true"
            if not materialize
            else "its export failed the golden-set check (see exports.json)"
        )
        raise ModelLoadError(f"{mv.ref} has no verified {' or '.join(wanted)} export; {hint}")
    candidates = tuple((b, registry.open_verified(mv, EXPORT_FILES[b])) for b in ready)
    if int8 is not None:
        candidates += (("onnx-int8", int8),)
    names = [b for b, _ in candidates]
    if backend not in AUTO_MODES:
        return Prepared(mv, backend, candidates[0][1], device, threads=threads_of(names))
    chosen_threads = threads_of(names)
    host = host_fingerprint(device, {n: chosen_threads.get(n, 0) for n in names})
    recorded = registry.derived(mv).get("auto", {}).get(host_key(host))
    return Prepared(
        mv,
        backend,
        candidates[0][1],
        device,
        candidates,
        chosen_threads,
        recorded if isinstance(recorded, dict) else None,
        remeasure,
    )


def _checked(registry: Registry, mv: ModelVersion) -> set[str]:
    """Backends whose export is recorded and was checked (passed or not): no rebuild."""
    derived = registry.derived(mv)
    files = derived.get("files", {})
    checked = {c.get("artefact") for c in derived.get("checks", [])}
    return {b for b in checked if isinstance(b, str) and EXPORT_FILES.get(b) in files}


def _verified(registry: Registry, mv: ModelVersion) -> set[str]:
    """Backends whose export is recorded and passed its golden-set check."""
    derived = registry.derived(mv)
    files = derived.get("files", {})
    return {b for b in verified_backends(derived) if EXPORT_FILES.get(b) in files}


def _int8_gate(registry: Registry, mv: ModelVersion) -> Path | None:
    """The verified int8 export when it passed its accuracy gate (int8 within
    ``max_drop_points`` of fp32 on the test set), else None: the one published with the
    version (``manifest.int8``), or one built later by ``training quantize`` (exports.json)."""
    published = mv.manifest.int8
    if published is not None:
        if not published.passed or not published.file:
            return None
        return registry.open_verified(mv, published.file)
    derived = registry.derived(mv)
    gate = derived.get("int8")
    if EXPORT_FILES["onnx-int8"] not in derived.get("files", {}) or not isinstance(gate, dict):
        return None
    drop, limit = gate.get("drop_points"), gate.get("max_drop_points")
    if not isinstance(drop, int | float) or not isinstance(limit, int | float) or drop > limit:
        return None
    return registry.open_verified(mv, EXPORT_FILES["onnx-int8"])


def _int8_artefact(registry: Registry, mv: ModelVersion) -> Path:
    """The accepted int8 export: published with the version, or built by
    `python -m training quantize` (it needs data, so the service never builds it)."""
    gated = _int8_gate(registry, mv)
    if gated is not None:
        return gated
    derived = registry.derived(mv)
    filename = EXPORT_FILES["onnx-int8"]
    if filename not in derived.get("files", {}) or "int8" not in derived:
        raise ModelLoadError(
            f"{mv.ref} has no int8 export; build it (calibration on training images, gated "
            f"on test accuracy) with `python -m training quantize {mv.ref} --data DIR`"
        )
    return registry.open_verified(mv, filename)
