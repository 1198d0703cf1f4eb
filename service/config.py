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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SEEDNET_", protected_namespaces=(), extra="ignore", frozen=True
    )

    registry_root: Path = Field(Path("models"), description="registry folder")
    model_name: str = Field("seednet", description="registry model name to serve")
    model_ref: str = Field("production", description="alias or version number to serve")
    backend: Literal["torchscript", "onnx", "eager"] = "torchscript"
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto = GPU if present")
    materialize_exports: bool = Field(
        True, description="build missing TorchScript/ONNX exports at start (verified)"
    )

    max_upload_bytes: int = Field(10 * 1024 * 1024, gt=0, description="bytes per image file")
    max_image_pixels: int = Field(40_000_000, gt=0, description="width x height per image")
    max_images_per_request: int = Field(64, gt=0)

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
    threads: int = Field(
        0, ge=0, description="compute threads per worker; 0 = available cores / workers"
    )
    alias_poll_s: float = Field(
        0,
        ge=0,
        description="re-resolve SEEDNET_MODEL_REF this often and swap when it moved (0 = "
        "off, or 5 s when workers > 1: a promote through one worker reaches all of them)",
    )

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
    def compute_threads(self) -> int:
        """Threads per worker: never more than the cores this process may use, in all."""
        if self.threads:
            return self.threads
        return max(1, len(os.sched_getaffinity(0)) // self.workers)

    @property
    def alias_poll_seconds(self) -> float:
        return self.alias_poll_s or (5.0 if self.workers > 1 else 0.0)
