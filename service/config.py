"""Service settings: plain data, read from SEEDNET_* environment variables.

Every field is documented in README.md ("Configuration"). ``create_app`` takes a
``Settings`` object, so tests and embedders pass configuration explicitly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _cgroup_cpus(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """CPUs the cgroup's quota allows (a container's or a Kubernetes pod's CPU limit), or
    None without a quota. cgroup v2 only: ``max 100000`` or ``QUOTA PERIOD``."""
    try:
        quota, period = Path(path).read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask (``--cpuset-cpus``, ``taskset``), and
    no more than its cgroup's CPU quota (``docker --cpus``, a pod's CPU limit), which a
    runtime would otherwise ignore and start a thread per core of the whole node."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpus()
    return min(cpus, quota) if quota is not None else cpus


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SEEDNET_", protected_namespaces=(), extra="ignore", frozen=True
    )

    registry_root: str | Path = Field(
        "models",
        description="registry: a folder, file://PATH or s3://BUCKET/PREFIX (credentials "
        "from the environment / AWS config)",
    )
    model_name: str = Field("seednet", description="registry model name to serve")
    model_ref: str = Field("production", description="alias or version number to serve")
    backend: Literal[
        "auto", "auto-fp32", "torchscript", "onnx", "openvino", "onnx-int8", "eager"
    ] = Field(
        "auto",
        description="auto = the fastest verified backend on this host, int8 included when "
        "its accuracy gate passed; auto-fp32 = the fastest full-precision one",
    )
    auto_remeasure: bool = Field(
        False,
        description="measure auto's candidates again at start instead of reusing the "
        "choice recorded for this host and version",
    )
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto = GPU if present")
    materialize_exports: bool = Field(
        True, description="build missing TorchScript/ONNX exports at start (verified)"
    )

    max_upload_bytes: int = Field(10 * 1024 * 1024, gt=0, description="bytes per image file")
    max_request_bytes: int = Field(
        16 * 1024 * 1024, gt=0, description="bytes per request body (multipart framing included)"
    )
    # 4096 x 4096: why this number is in service.dataplane.images.ImageLimits
    max_image_pixels: int = Field(4096 * 4096, gt=0, description="width x height per image")
    max_request_pixels: int = Field(
        2 * 4096 * 4096, gt=0, description="decoded pixels per request, summed over its images"
    )
    max_images_per_request: int = Field(64, gt=0)
    decode_workers: int | None = Field(
        None,
        gt=0,
        description="threads decoding images, shared fairly by all requests (unset: this "
        "worker's CPUs, at most 4)",
    )
    inference_threads: int | None = Field(
        None,
        gt=0,
        description="model runtime threads per worker (unset: chosen per backend, see threads_for)",
    )

    # Slow clients. uvicorn's own settings where it has one; the header and body
    # deadlines are the service's (service.frontends.http.server, service.frontends.http.bodies).
    timeout_headers: float = Field(
        10.0, gt=0, description="seconds for a request line + headers to arrive"
    )
    timeout_body: float = Field(60.0, gt=0, description="seconds for a whole request body")
    timeout_keep_alive: int = Field(5, gt=0, description="idle keep-alive connection, seconds")
    timeout_graceful_shutdown: int = Field(
        20, gt=0, description="seconds in-flight requests get after SIGTERM"
    )
    h11_max_incomplete_event_size: int = Field(
        16 * 1024, gt=0, description="bytes of request line + headers"
    )
    limit_concurrency: int | None = Field(
        None, gt=0, description="connections + tasks before uvicorn answers 503 (unset: none)"
    )

    batching: bool = Field(True, description="merge concurrent requests into one forward pass")
    max_batch_size: int = Field(64, gt=0, description="images per forward pass")
    max_batch_wait_ms: float = Field(2.0, ge=0, description="how long a batch waits to fill")
    cuda_graphs: bool = Field(True, description="replay CUDA graphs for small batches on GPU")
    admission: bool = Field(
        True,
        description="admission control: refuse at once (429) what cannot start within "
        "queue_timeout_ms at the measured model speed; answer 503 to a request whose "
        "deadline passed before its batch started (false: queue without limit)",
    )
    max_queue_images: int | None = Field(
        None,
        gt=0,
        description="images that may wait for a batch; more are refused with 429 (unset: "
        "what the model computes within queue_timeout_ms, from its measured speed)",
    )
    queue_timeout_ms: float = Field(
        500,
        gt=0,
        description="the deadline of a request: its batch must start within this many ms "
        "(admission control)",
    )

    explain: Literal["on", "lazy", "off"] = Field(
        "on",
        description="explanations (POST /explain, the inference protocol's explain outputs): "
        "on = their worker process starts with the service; lazy = at the first explanation; "
        "off = refused",
    )
    explain_queue: int = Field(
        8,
        ge=0,
        description="explanation requests that may wait for the explanation worker; more "
        "are refused with 429 and Retry-After",
    )
    explain_timeout_s: float = Field(
        30,
        gt=0,
        description="an explanation request must be answered within this many seconds of "
        "arriving at the queue (else 503 with Retry-After; one still waiting is never computed)",
    )

    workers: int = Field(1, ge=1, le=64, description="worker processes (each loads the model)")
    alias_poll_s: float = Field(
        0,
        ge=0,
        description="re-resolve SEEDNET_MODEL_REF this often and swap when it moved (0 = "
        "off, or 5 s when workers > 1: a promote through one worker reaches all of them)",
    )

    rollout_poll_s: float = Field(
        2.0,
        gt=0,
        description="read the served model's rollout record (one conditional read) and judge "
        "the running step this often, in seconds",
    )
    shadow_queue_images: int = Field(
        256,
        gt=0,
        description="images of shadow traffic that may wait for the model thread; more are "
        "dropped and counted (seednet_shadow_dropped_total)",
    )

    def cpus_per_worker(self) -> int:
        """Each worker process's share of the CPUs: workers never oversubscribe them."""
        return max(1, available_cpus() // self.workers)

    def decode_threads(self) -> int:
        """Decode threads: they use a CPU only while there is something to decode, so
        they are not subtracted from the model's (see :meth:`threads_for`)."""
        if self.decode_workers is not None:
            return self.decode_workers
        return min(4, self.cpus_per_worker())

    def threads_for(self, backend: str) -> int:
        """Intra-op threads of ``backend`` on the CPU, chosen from what its runtime does
        while it waits. ONNX Runtime (configured not to spin) and OpenVINO put idle threads
        to sleep, so they get every CPU of this worker and decoding takes a core only when
        it has work. torch's threads (TorchScript, eager) spin-wait at every parallel step:
        with as many threads as cores, a decode flood took seconds from each batch
        (tests/service/test_hostile.py), so they leave one core to decoding when there
        are two or more. ``SEEDNET_INFERENCE_THREADS`` overrides both."""
        if self.inference_threads is not None:
            return self.inference_threads
        cpus = self.cpus_per_worker()
        if backend in ("torchscript", "eager"):
            return max(1, cpus - 1)
        return cpus

    admin_token: str | None = Field(None, description="bearer token for /models admin routes")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="KServe v2 gRPC port on `host` (unset: no gRPC server; 0: any free port)",
    )
    log_level: str = "info"
    access_log: bool = Field(True, description="one log line per request (uvicorn's access log)")

    @property
    def alias_poll_seconds(self) -> float:
        return self.alias_poll_s or (5.0 if self.workers > 1 else 0.0)
