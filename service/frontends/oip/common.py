"""What the two inference-protocol front ends (REST ``/v2`` and gRPC) share.

``service.frontends.oip.codec`` turns wire data into an ``InferRequest`` and back; this module
is the service side of it: which model a name and version mean, the metadata and
config documents, running a request through the same preprocessing and batcher as
``/predict``, the request-size limit, and the one table from an error to a status
(``error_status``), which the REST router and the gRPC servicer both apply.

Names and versions: the model name is the registry name and versions are registry
versions. The service serves one version at a time (the one ``SEEDNET_MODEL_REF``
resolved to, or the last promoted); no version means that one. Another version that
exists in the registry gets a 400 that says which version is served.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

import numpy as np

from registry.errors import InvalidNameError, NotFoundError
from service.config import Settings
from service.dataplane.decoding import decode_uploads
from service.dataplane.images import PreprocessingError
from service.errors import ApiError, http_status
from service.frontends.http.bodies import Upload
from service.frontends.oip.codec.errors import ProtocolError
from service.frontends.oip.codec.metadata import (
    model_config,
    model_metadata,
    server_metadata,
    triton_platform,
)
from service.frontends.oip.codec.request import InferRequest
from service.frontends.oip.codec.signature import ModelSignature, seednet_signature
from service.lifecycle.prepare import ServingModel
from service.state import ServiceState

SERVER_NAME = "seednet"
#: Per image, the most a JSON ``images`` tensor takes: 3072 numbers of up to 3 digits,
#: separators (and a space each, as pretty-printers write), brackets of a nested list.
JSON_IMAGE_BYTES = 3 * 32 * 32 * 5 + 4 * 1024
#: The JSON header of a request (names, shapes, parameters) on top of the tensor data.
HEADER_ALLOWANCE = 64 * 1024


class OipError(Exception):
    """A request the service refuses, with its HTTP status (gRPC maps the status)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def error_status(exc: BaseException) -> tuple[int, str] | None:
    """The HTTP status and message of an error a client caused; None for a server fault.

    Image errors get the statuses ``/predict`` gives them (413 too large, 415 not an
    image, 422 corrupt...), from the one table in ``service.errors``.
    """
    if isinstance(exc, OipError):
        return exc.status, exc.message
    if isinstance(exc, ProtocolError):
        return 400, exc.message
    if isinstance(exc, PreprocessingError):
        return http_status(exc), exc.message
    if isinstance(exc, NotFoundError | InvalidNameError):
        return 404, " ".join(str(exc).split())
    if isinstance(exc, ApiError):
        return exc.status, exc.message
    return None


def server_version() -> str:
    try:
        return package_version("seednet")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "0+unknown"


def max_request_bytes(s: Settings) -> int:
    """The largest inference request body accepted (REST body, gRPC message).

    Enough for ``max_images_per_request`` images in the largest form allowed: encoded
    files of up to ``max_upload_bytes`` (plus their 4-byte length prefix), or pixels as
    JSON numbers, plus the JSON header.
    """
    per_image = max(s.max_upload_bytes + 4, JSON_IMAGE_BYTES)
    return s.max_images_per_request * per_image + HEADER_ALLOWANCE


@lru_cache(maxsize=8)
def _signature(labels: tuple[str, ...], attention_dims: tuple[int, ...]) -> ModelSignature:
    return seednet_signature(labels, attention_dims)


def signature_of(model: ServingModel) -> ModelSignature:
    """The protocol signature of a loaded model (its class names and attention shape)."""
    return _signature(tuple(model.class_names), tuple(model.attention_dims))


def served_model(state: ServiceState, name: str, version: str | None) -> ServingModel:
    """The loaded model that ``name`` (and ``version``; None or "" = the served one) means.

    503 while no model is loaded, 404 for a name or version the registry does not have,
    400 for one it has that is not the one being served.
    """
    model = state.model
    if model is None:
        raise OipError(503, "the model is still loading; retry shortly")
    served, served_version = model.info["name"], model.info["version"]
    if name == served and version in (None, "", served_version):
        return model  # the common case touches no file
    try:
        versions = [mv.version for mv in state.registry.versions(name)]
    except (NotFoundError, InvalidNameError):
        raise OipError(404, f"unknown model {name!r}; this service serves {served!r}") from None
    if name != served:
        raise OipError(
            400,
            f"model {name!r} is in the registry but not loaded: this service serves one "
            f"model version at a time, {served!r} version {served_version}",
        )
    if version not in versions:
        raise OipError(
            404, f"model {name!r} has no version {version!r}; its versions: {', '.join(versions)}"
        )
    raise OipError(
        400,
        f"{name!r} version {version} exists but is not loaded: this service serves one "
        f"version at a time, version {served_version}",
    )


def registry_versions(state: ServiceState, model: ServingModel) -> list[str]:
    """The registry versions of the served model's name (the served one at least)."""
    try:
        versions = [mv.version for mv in state.registry.versions(model.info["name"])]
    except NotFoundError:  # deleted from the registry while it serves
        versions = []
    return versions or [model.info["version"]]


# What metadata and config advertise: the tensor input. ``image_bytes`` (BYTES [N], encoded
# files) is accepted on the same model, but listing it would make perf_analyzer's default
# run (random data for every advertised input) send both inputs, which is refused.
ADVERTISED_INPUTS = ("images",)


def server_metadata_doc() -> dict[str, Any]:
    """``GET /v2`` / ``ServerMetadata``."""
    return server_metadata(SERVER_NAME, server_version())


def model_metadata_doc(state: ServiceState, model: ServingModel) -> dict[str, Any]:
    """``GET /v2/models/{name}`` / ``ModelMetadata``: every registry version is listed;
    ``served_version`` (REST only: the gRPC message has no such field) says which one
    this service runs."""
    doc = model_metadata(
        model.info["name"],
        registry_versions(state, model),
        triton_platform(model.info["backend"]),
        signature_of(model),
        inputs=ADVERTISED_INPUTS,
    )
    doc["served_version"] = model.info["version"]
    doc["note"] = (
        "versions lists the registry's versions; this service serves one version at a "
        "time, served_version. Besides images, the model accepts image_bytes (BYTES [N]: "
        "encoded image files, preprocessed as POST /predict does), one of the two per request"
    )
    return doc


def model_config_doc(state: ServiceState, model: ServingModel) -> dict[str, Any]:
    """``GET /v2/models/{name}/config``: Triton's model config (what perf_analyzer reads).

    ``max_batch_size`` is the per-request image limit; ``dynamic_batching`` is there
    when the service batches, with its wait.
    """
    s = state.settings
    return model_config(
        model.info["name"],
        triton_platform(model.info["backend"]),
        max_batch_size=s.max_images_per_request,
        max_queue_delay_microseconds=round(s.max_batch_wait_ms * 1000) if s.batching else None,
        signature=signature_of(model),
        inputs=ADVERTISED_INPUTS,
    )


async def run_inference(
    state: ServiceState, request: InferRequest
) -> tuple[dict[str, np.ndarray], ServingModel]:
    """The model's outputs for a validated request, and the model that computed them.

    ``images`` go straight to the batcher; ``image_bytes`` are decoded first exactly as
    ``/predict`` decodes uploads: same limits and errors, the same bounded decode pool and
    per-request pixel budget.
    """
    if request.images is not None:
        pixels = np.ascontiguousarray(request.images, dtype=np.uint8)
    else:
        files = request.image_bytes or []
        uploads = [Upload(f"image_bytes[{i}]", f) for i, f in enumerate(files)]
        prepared = await decode_uploads(state.decoder, uploads, state.limits)
        pixels = np.stack([p.array for p in prepared])
    assert state.batcher is not None, "the batcher runs from start-up to shutdown"
    (probs, attention), model = await state.batcher.submit(pixels)
    return {"probabilities": probs, "attention": attention}, model
