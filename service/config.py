"""Service settings: plain data, read from SEEDNET_* environment variables.

Every field is documented in README.md ("Configuration"). ``create_app`` takes a
``Settings`` object, so tests and embedders pass configuration explicitly.
"""

from __future__ import annotations

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
    max_image_pixels: int = Field(40_000_000, gt=0, description="width x height per image")
    max_images_per_request: int = Field(64, gt=0)

    batching: bool = Field(True, description="merge concurrent requests into one forward pass")
    max_batch_size: int = Field(64, gt=0, description="images per forward pass")
    max_batch_wait_ms: float = Field(2.0, ge=0, description="how long a batch waits to fill")
    cuda_graphs: bool = Field(True, description="replay CUDA graphs for small batches on GPU")

    admin_token: str | None = Field(None, description="bearer token for /models admin routes")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"
    access_log: bool = Field(True, description="one log line per request (uvicorn's access log)")
