"""Service settings: plain data, read from SEEDNET_* environment variables.

Every field is documented in README.md ("Configuration"). ``create_app`` takes a
``Settings`` object, so tests and embedders pass configuration explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SEEDNET_", protected_namespaces=(), extra="ignore", frozen=True
    )

    registry_root: Path = Field(Path("models"), description="registry folder")
    model_name: str = Field("seednet", description="registry model name to serve")
    model_ref: str = Field("production", description="alias or version number to serve")
    backend: Literal["auto", "torchscript", "onnx", "openvino", "onnx-int8", "eager"] = Field(
        "auto",
        description="auto = the fastest verified fp32 backend, measured at load; "
        "onnx-int8 only when named",
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
        description="threads decoding images, shared fairly by all requests (unset: half "
        "of this worker's CPUs, 1 to 4)",
    )
    inference_threads: int | None = Field(
        None,
        gt=0,
        description="model runtime threads per worker (unset: this worker's CPUs left by "
        "the decode threads, >= 1)",
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
    max_queue_images: int = Field(
        512, gt=0, description="images that may wait for a batch; more are refused with 429"
    )
    queue_timeout_ms: float = Field(
        0, ge=0, description="answer 503 to a request still waiting after this (0 = no limit)"
    )

    workers: int = Field(1, ge=1, le=64, description="worker processes (each loads the model)")
    alias_poll_s: float = Field(
        0,
        ge=0,
        description="re-resolve SEEDNET_MODEL_REF this often and swap when it moved (0 = "
        "off, or 5 s when workers > 1: a promote through one worker reaches all of them)",
    )

    def cpus_per_worker(self) -> int:
        """Each worker process's share of the CPUs: workers never oversubscribe them."""
        return max(1, available_cpus() // self.workers)

    def decode_threads(self) -> int:
        if self.decode_workers is not None:
            return self.decode_workers
        return min(4, max(1, self.cpus_per_worker() // 2))

    def torch_threads(self) -> int:
        """Intra-op threads of the model runtime (torch, ONNX Runtime, OpenVINO). By
        default the decode threads keep their CPUs: the runtime's threads spin-wait at
        every parallel step, and with fewer cores than threads a batch took seconds
        instead of milliseconds (tests/service/test_hostile.py)."""
        if self.inference_threads is not None:
            return self.inference_threads
        return max(1, self.cpus_per_worker() - self.decode_threads())

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
