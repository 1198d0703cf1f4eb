"""Model backends (TorchScript, ONNX Runtime, eager PyTorch) and dynamic batching.

Every backend takes uint8 images ``[N, 3, 32, 32]`` and returns numpy
``probabilities [N, classes]`` and ``attention [N, blocks, L]``; normalisation is
inside the graph. ``Batcher`` merges concurrent requests into one forward pass
(up to ``max_batch_size`` images or ``max_wait`` seconds) and runs the model on a
single worker thread, so the event loop never blocks on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from service.registry import ModelVersion, Registry

log = logging.getLogger("seednet.inference")

Outputs = tuple[np.ndarray, np.ndarray]


class ModelLoadError(RuntimeError):
    """The requested model could not be loaded (unknown, unverified, broken)."""


class Backend(Protocol):
    name: str
    device: str

    def run(self, images: np.ndarray) -> Outputs: ...


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("SEEDNET_DEVICE=cuda but no CUDA device is available")
    return name


class _CudaGraphs:
    """Replay captured CUDA graphs for small batches (padded up to a power of two).

    Launch overhead dominates one small image on a GPU; a graph replays the whole
    forward pass as one launch. Batches above ``max_batch`` run normally.
    """

    def __init__(
        self, fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], max_batch: int = 32
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

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        n = x.shape[0]
        size = next((s for s in self.sizes if s >= n), None)
        if size is None or size not in self.graphs:
            return None
        graph, static_in, (probs, att) = self.graphs[size]
        static_in.zero_()
        static_in[:n].copy_(x)
        graph.replay()
        return probs[:n].clone(), att[:n].clone()


class TorchBackend:
    """A TorchScript module (or an eager ``InferenceModel``) on CPU or CUDA."""

    def __init__(
        self, module: torch.nn.Module, name: str, device: str, cuda_graphs: bool = False
    ) -> None:
        self.name = name
        self.device = device
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
        x = torch.from_numpy(images).to(self.device, non_blocking=True)
        with torch.inference_mode():
            out = self.graphs(x) if self.graphs is not None else None
            probs, att = out if out is not None else self.module(x)
        return probs.float().cpu().numpy(), att.float().cpu().numpy()


class OnnxBackend:
    """ONNX Runtime: the CUDA execution provider on GPU, else the CPU one."""

    name = "onnx"

    def __init__(self, path: str, device: str) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" in available:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(path, providers=providers)
        self.device = "cuda" if self.session.get_providers()[0].startswith("CUDA") else "cpu"

    def run(self, images: np.ndarray) -> Outputs:
        probs, att = self.session.run(["probabilities", "attention"], {"images": images})
        return probs, att


EXPORT_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}


def load_backend(
    registry: Registry,
    mv: ModelVersion,
    backend: str,
    device: str,
    materialize_exports: bool = True,
    cuda_graphs: bool = True,
) -> Backend:
    """Load ``mv`` for serving; every file is checked against its recorded sha256 first."""
    device = resolve_device(device)
    if backend == "eager":
        from training.export import inference_model

        weights = registry.open_verified(mv, "weights.safetensors")
        model = inference_model(
            mv.manifest["model"]["config"], weights, mv.manifest.get("normalization")
        )
        return TorchBackend(model, "eager", device, cuda_graphs)
    filename = EXPORT_FILES.get(backend)
    if filename is None:
        raise ModelLoadError(f"unknown backend {backend!r}; expected torchscript, onnx or eager")
    if filename not in registry.derived(mv).get("files", {}):
        if not materialize_exports:
            raise ModelLoadError(
                f"{mv.ref} has no {filename}; run `python -m service.registry materialize "
                f"{mv.ref}` or set SEEDNET_MATERIALIZE_EXPORTS=true"
            )
        from training.export import materialize

        log.info("building the exports of %s (verified against its golden set)", mv.ref)
        materialize(registry, mv)
    path = registry.open_verified(mv, filename)
    if backend == "onnx":
        return OnnxBackend(str(path), device)
    module = torch.jit.load(str(path), map_location=device)
    return TorchBackend(module, "torchscript", device, cuda_graphs)


@dataclass
class ServingModel:
    """A loaded, warmed-up model and what the API reports about it."""

    version: ModelVersion
    backend: Backend
    class_names: list[str]
    info: dict = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        registry: Registry,
        mv: ModelVersion,
        backend: str,
        device: str,
        materialize_exports: bool = True,
        cuda_graphs: bool = True,
        warmup_batches: tuple[int, ...] = (1, 8),
    ) -> ServingModel:
        be = load_backend(registry, mv, backend, device, materialize_exports, cuda_graphs)
        for n in warmup_batches:  # first calls allocate and pick kernels: pay it now
            probs, att = be.run(np.zeros((n, 3, 32, 32), dtype=np.uint8))
            if probs.shape != (n, len(mv.manifest["class_names"])) or att.ndim != 3:
                raise ModelLoadError(
                    f"{mv.ref}: unexpected output shapes {probs.shape}, {att.shape}"
                )
        return cls(
            mv,
            be,
            list(mv.manifest["class_names"]),
            {
                "name": mv.name,
                "version": mv.version,
                "backend": be.name,
                "device": be.device,
            },
        )


@dataclass
class _Pending:
    images: np.ndarray
    future: asyncio.Future
    enqueued: float


@dataclass
class BatchStats:
    """Callbacks the metrics module hooks into (kept here as plain callables)."""

    on_batch: Callable[[int, float], None] = lambda size, seconds: None
    on_wait: Callable[[float], None] = lambda seconds: None


class Batcher:
    """Dynamic batching on one worker thread.

    ``submit`` splits a request into chunks of at most ``max_batch_size`` images; the
    worker takes the first waiting chunk, then keeps adding chunks until the batch is
    full or ``max_wait`` has passed, runs one forward pass, and hands every request
    exactly its own rows. With batching off, each chunk runs on its own.
    """

    def __init__(
        self,
        get_model: Callable[[], ServingModel],
        max_batch_size: int,
        max_wait: float,
        enabled: bool = True,
        stats: BatchStats | None = None,
    ) -> None:
        self.get_model = get_model
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait
        self.enabled = enabled
        self.stats = stats or BatchStats()
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seednet-model")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=True)

    async def run_in_model_thread(self, fn: Callable, *args):
        """Run ``fn`` on the model thread (loading a model too: never two at once)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def submit(self, images: np.ndarray) -> tuple[Outputs, ServingModel]:
        loop = asyncio.get_running_loop()
        pending = []
        for start in range(0, len(images), self.max_batch_size):
            p = _Pending(
                images[start : start + self.max_batch_size],
                loop.create_future(),
                time.perf_counter(),
            )
            pending.append(p)
            self.queue.put_nowait(p)
        results = await asyncio.gather(*(p.future for p in pending))
        model = results[0][1]
        probs = np.concatenate([r[0][0] for r in results])
        att = np.concatenate([r[0][1] for r in results])
        return (probs, att), model

    async def _worker(self) -> None:
        while True:
            first = await self.queue.get()
            batch = [first]
            size = len(first.images)
            if self.enabled:
                deadline = time.perf_counter() + self.max_wait
                while size < self.max_batch_size:
                    try:
                        nxt = self.queue.get_nowait()
                    except asyncio.QueueEmpty:
                        remaining = deadline - time.perf_counter()
                        if remaining <= 0:
                            break
                        try:
                            nxt = await asyncio.wait_for(self.queue.get(), remaining)
                        except asyncio.TimeoutError:
                            break
                    if size + len(nxt.images) > self.max_batch_size:
                        # does not fit: it leads the next batch instead
                        await self._run([*batch])
                        batch, size = [nxt], len(nxt.images)
                        deadline = time.perf_counter() + self.max_wait
                        continue
                    batch.append(nxt)
                    size += len(nxt.images)
            await self._run(batch)

    async def _run(self, batch: list[_Pending]) -> None:
        now = time.perf_counter()
        for p in batch:
            self.stats.on_wait(now - p.enqueued)
        images = np.concatenate([p.images for p in batch]) if len(batch) > 1 else batch[0].images
        t0 = time.perf_counter()
        try:
            model = self.get_model()  # the model at the moment the batch runs (swap-safe)
            probs, att = await self.run_in_model_thread(model.backend.run, images)
        except Exception as exc:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        self.stats.on_batch(len(images), time.perf_counter() - t0)
        offset = 0
        for p in batch:
            n = len(p.images)
            if not p.future.done():  # a cancelled request simply drops its rows
                p.future.set_result(((probs[offset : offset + n], att[offset : offset + n]), model))
            offset += n
