"""What runs inside the explanation worker process (started by ``explaining.ExplainRunner``).

Explanations need gradients through the eager model (``seednet.explain.Explainer``), so
they cannot use the served exports and they cost about as much CPU as a forward pass of
a batch of one. They run in a process of their own, spawned (not forked: the service has
threads), so that:

- torch's intra-op thread count, which is per process, is 1 here whatever the serving
  backend uses, and the worker runs at a lower CPU priority (``nice``): when both want
  the CPU, the scheduler favours the process that answers ``/predict``;
- the worker's Python code never holds the service's GIL, and its memory (a copy of the
  model, activations and gradients) is its own.

Each served version gets one :class:`~seednet.explain.Explainer`, built from the
registry (weights checked against their sha256) when the version starts serving
(:func:`prepare`) or at its first explanation; the last :data:`KEPT` are kept, so a
request pinned to the version that was just swapped out is still answered. Maps are
encoded for the wire here too (PNG, float16), so that work stays off the service's event
loop.

Every function here is called through ``concurrent.futures`` and returns plain data:
errors come back as an ``error`` pair, never as an exception a pickle might not rebuild.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

#: Explainers kept (the serving version and the one before it).
KEPT = 2


@dataclass(frozen=True)
class VersionKey:
    """A registry version, as the worker opens it."""

    root: str
    name: str
    version: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class WireOptions:
    """Encode each image's maps for JSON (``seednet.heatmaps.wire_explanation``)."""

    encodings: tuple[str, ...] = ("png",)
    branch_maps: tuple[str, ...] = ("gradcam", "strength")
    include_input: bool = False


@dataclass(frozen=True)
class ExplainJob:
    """One request's images and what to explain (validated by the service first)."""

    key: VersionKey
    pixels: np.ndarray  # uint8 [N, 3, 32, 32]
    target: int | None = None  # None: each image's predicted class
    blocks: tuple[int, ...] | None = None  # None: every block
    macro: bool = True
    labels: tuple[str, ...] = ()
    wire: WireOptions | None = None  # None: the maps as arrays


@dataclass
class JobResult:
    """What the worker sends back. ``arrays`` always holds ``logits``, ``probabilities``,
    ``target``, ``attention`` (and every map when the job asked for arrays); ``wire`` one
    JSON-ready dict per image when it asked for them. ``error``: (kind, message), kind
    ``invalid`` (the arguments) or ``failed`` (anything else)."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    wire: list[dict] | None = None
    seconds: float = 0.0
    error: tuple[str, str] | None = None


_explainers: OrderedDict[VersionKey, object] = OrderedDict()
_registries: dict[str, object] = {}


def initialize(threads: int, nice: int) -> None:
    """The worker's set-up: one torch thread, a lower priority, no Ctrl-C of its own (the
    service stops it)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)  # before torch is imported
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice > 0:
        # not permitted here (a sandbox): run at the service's priority
        with contextlib.suppress(OSError):
            os.nice(nice)
    import torch

    torch.set_num_threads(threads)


def _explainer(key: VersionKey):
    from registry import Registry
    from seednet.explain import Explainer

    if key in _explainers:
        _explainers.move_to_end(key)
        return _explainers[key]
    registry = _registries.get(key.root)
    if registry is None:
        registry = _registries[key.root] = Registry(key.root)
    mv = registry.resolve(key.name, key.version)
    # The served graph carries a calibrated version's calibration, so the explanation's
    # probabilities are the served ones; the maps use the logits and do not depend on it.
    explainer = Explainer.from_registry(registry, mv, device="cpu")
    _explainers[key] = explainer
    while len(_explainers) > KEPT:
        _explainers.popitem(last=False)
    return explainer


def _failure(exc: Exception) -> tuple[str, str]:
    if isinstance(exc, ValueError):
        return ("invalid", str(exc))
    return ("failed", f"{type(exc).__name__}: {exc}")


def prepare(key: VersionKey) -> JobResult:
    """Build (or keep) the explainer of ``key``; nothing is explained."""
    t0 = time.perf_counter()
    try:
        _explainer(key)
    except Exception as exc:
        return JobResult(seconds=time.perf_counter() - t0, error=_failure(exc))
    return JobResult(seconds=time.perf_counter() - t0)


def _input_png(pixels: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0))).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def run(job: ExplainJob) -> JobResult:
    """Explain ``job.pixels``; the maps as arrays, or encoded per image for JSON."""
    from seednet.heatmaps import wire_explanation

    t0 = time.perf_counter()
    try:
        explainer = _explainer(job.key)
        result = explainer.explain(
            job.pixels,
            target=job.target,
            blocks=None if job.blocks is None else list(job.blocks),
            macro=job.macro,
        )
        if job.wire is None:
            return JobResult(arrays=result, seconds=time.perf_counter() - t0)
        labels = job.labels or tuple(str(i) for i in range(result["logits"].shape[1]))
        wire = []
        for i in range(len(job.pixels)):
            entry = wire_explanation(
                result,
                i,
                encodings=job.wire.encodings,
                branch_maps=job.wire.branch_maps,
                labels=labels,
            )
            if job.wire.include_input:
                entry["model_input"] = _input_png(job.pixels[i])
            wire.append(entry)
    except Exception as exc:
        return JobResult(seconds=time.perf_counter() - t0, error=_failure(exc))
    kept = {k: result[k] for k in ("logits", "probabilities", "target", "attention")}
    return JobResult(arrays=kept, wire=wire, seconds=time.perf_counter() - t0)


def ping() -> int:
    """The worker's process id (it is up and imports work)."""
    return os.getpid()
