"""What the inference protocol's two transports (REST ``/v2`` and gRPC) share.

``codec`` turns wire data into an ``InferRequest`` and back; this module is the service
side of it: which model a name and version mean, the metadata and config documents, the
size limits of a request, and handing a parsed request to the data plane
(:func:`run_inference`).
Errors are the service's own (``service.errors``): each transport renders them from the
one failure table.

Names and versions: the model name is the registry name and versions are registry
versions. The service serves one version at a time (the one ``SEEDNET_MODEL_REF``
resolved to, or the last promoted); no version means that one. Another version that
exists in the registry gets a 400 that says which version is served.

Size limits, derived from the largest valid request (``max_images_per_request`` images):

- the JSON part (REST): every image as JSON numbers (3,072 numbers of up to three digits,
  a separator and a space each, plus brackets), plus 64 KiB of names, shapes and
  parameters: about 1.3 MB for 64 images. JSON costs 20 to 30 times its size in memory
  once parsed, so it stays this small (and holds at most as many ``[``/``{`` as the most
  nested valid tensor); files go in the binary part;
- the binary part (REST binary tensors, gRPC raw contents): the encoded files of one
  ``/predict`` request (``max_request_bytes``, 16 MiB by default, or ``max_upload_bytes``
  per image if that is less) with their 4-byte length prefixes, or the raw pixels,
  whichever is larger;
- a REST body or a gRPC message: the two together.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

import numpy as np

from registry.errors import InvalidNameError, NotFoundError
from service.config import Settings
from service.dataplane.backends import PLATFORMS
from service.dataplane.images import ImageFile
from service.dataplane.inference import DataPlane, Inference
from service.dataplane.served import ServingModel
from service.dataplane.traffic import NO_ROUTE, Route
from service.errors import ModelNotFound, ModelNotServed, NotReady
from service.frontends.oip.codec.metadata import (
    EXPLAIN_EXTENSION,
    EXTENSIONS,
    model_config,
    model_metadata,
    server_metadata,
)
from service.frontends.oip.codec.request import InferRequest
from service.frontends.oip.codec.signature import (
    EXPLAIN_PARAMETERS,
    ModelSignature,
    seednet_signature,
)
from service.state import ServiceState

SERVER_NAME = "seednet"
#: Per image, the most a JSON ``images`` tensor takes (see the module docstring).
JSON_IMAGE_BYTES = 3 * 32 * 32 * 5 + 4 * 1024
#: The JSON header of a request (names, shapes, parameters) on top of the tensor data.
HEADER_ALLOWANCE = 64 * 1024
#: Per image, the JSON containers (``[``/``{``) of the most nested valid ``images``
#: tensor: one list per image, per channel and per row.
JSON_IMAGE_CONTAINERS = 1 + 3 + 3 * 32


@dataclass(frozen=True)
class RequestLimits:
    """The byte limits of one inference request (see the module docstring)."""

    json_bytes: int
    binary_bytes: int
    json_containers: int

    @property
    def total_bytes(self) -> int:
        return self.json_bytes + self.binary_bytes


def request_limits(s: Settings) -> RequestLimits:
    n = s.max_images_per_request
    return RequestLimits(
        json_bytes=n * JSON_IMAGE_BYTES + HEADER_ALLOWANCE,
        binary_bytes=max(min(s.max_request_bytes, n * s.max_upload_bytes) + 4 * n, n * 3 * 32 * 32),
        json_containers=n * JSON_IMAGE_CONTAINERS + 1024,
    )


def server_version() -> str:
    try:
        return package_version("seednet")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "0+unknown"


@lru_cache(maxsize=8)
def _signature(
    labels: tuple[str, ...], attention_dims: tuple[int, ...], ood: bool
) -> ModelSignature:
    return seednet_signature(labels, attention_dims, ood)


def signature_of(model: ServingModel) -> ModelSignature:
    """The protocol signature of a loaded model (its class names, attention shape, and
    the out-of-distribution outputs of a calibrated version)."""
    ood = model.ood_threshold is not None
    return _signature(tuple(model.class_names), tuple(model.attention_dims), ood)


def served_model(state: ServiceState, name: str, version: str | None) -> ServingModel:
    """The loaded model that ``name`` (and ``version``; None or "" = the served one) means.

    503 while no model is loaded, 404 for a name or version the registry does not have,
    400 for one it has that is not the one being served.
    """
    model = state.model
    if model is None:
        raise NotReady()
    served, served_version = model.info["name"], model.info["version"]
    if name == served and version in (None, "", served_version):
        return model  # the common case touches no file
    candidate = state.candidate  # a rollout's, loaded beside: its version answers too
    if candidate is not None and name == served and version == candidate.info["version"]:
        return candidate
    try:
        versions = [mv.version for mv in state.registry.versions(name)]
    except (NotFoundError, InvalidNameError):
        raise ModelNotFound(f"unknown model {name!r}; this service serves {served!r}") from None
    if name != served:
        raise ModelNotServed(
            f"model {name!r} is in the registry but not loaded: this service serves one "
            f"model version at a time, {served!r} version {served_version}",
        )
    if version not in versions:
        raise ModelNotFound(
            f"model {name!r} has no version {version!r}; its versions: {', '.join(versions)}"
        )
    raise ModelNotServed(
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


def explains(state: ServiceState) -> bool:
    return state.explanations is not None and state.explanations.enabled


def server_metadata_doc(state: ServiceState | None = None) -> dict[str, Any]:
    """``GET /v2`` / ``ServerMetadata``; ``explain`` among the extensions when on."""
    extensions = (*EXTENSIONS, EXPLAIN_EXTENSION) if state and explains(state) else EXTENSIONS
    return server_metadata(SERVER_NAME, server_version(), extensions)


def explain_metadata(model: ServingModel) -> dict[str, Any]:
    """What REST model metadata says of the explain extension (gRPC's message has no room)."""
    return {
        "outputs": [
            {"name": t.name, "datatype": t.datatype, "shape": [-1, *t.dims]}
            for t in signature_of(model).on_request
        ],
        "parameters": EXPLAIN_PARAMETERS,
        "note": "returned only when named; the -1 after the batch dimension is the number "
        "of blocks asked for",
    }


def model_metadata_doc(state: ServiceState, model: ServingModel) -> dict[str, Any]:
    """``GET /v2/models/{name}`` / ``ModelMetadata``: every registry version is listed;
    ``served_version`` (REST only: the gRPC message has no such field) says which one
    this service runs."""
    doc = model_metadata(
        model.info["name"],
        registry_versions(state, model),
        PLATFORMS[model.info["backend"]],
        signature_of(model),
        inputs=ADVERTISED_INPUTS,
    )
    doc["served_version"] = model.info["version"]
    if explains(state):
        doc["explain"] = explain_metadata(model)
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
        PLATFORMS[model.info["backend"]],
        max_batch_size=s.max_images_per_request,
        max_queue_delay_microseconds=round(s.max_batch_wait_ms * 1000) if s.batching else None,
        signature=signature_of(model),
        inputs=ADVERTISED_INPUTS,
    )


async def run_inference(
    plane: DataPlane, request: InferRequest, protocol: str, route: Route = NO_ROUTE
) -> Inference:
    """A validated request through the data plane: ``images`` as pixels, ``image_bytes``
    as files (decoded exactly as ``/predict`` decodes uploads: same limits and errors);
    ``route``: the version it pins or its client key (``service.frontends.versions``),
    and the outputs the answer must hold."""
    route = replace(route, outputs=tuple(o.name for o in request.outputs))
    if request.images is not None:
        return await plane.infer(pixels=np.asarray(request.images), protocol=protocol, route=route)
    files = [ImageFile(f"image_bytes[{i}]", f) for i, f in enumerate(request.image_bytes or [])]
    return await plane.infer(files=files, protocol=protocol, route=route)
