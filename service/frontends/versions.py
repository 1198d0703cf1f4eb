"""Which version a request asks for, and which one answered: the same words on every front
end (``service.dataplane.traffic`` decides).

- ``X-Model-Version: N`` (HTTP header, gRPC metadata ``x-model-version``) pins version
  ``N`` when it is loaded here (the serving version, or a rollout's candidate); the
  inference protocol's own model version (``/v2/models/M/versions/N/infer``, the gRPC
  request's ``model_version``) does the same;
- ``X-Client-Key: <any id>`` keeps a client on one version for the whole of a canary;
- every answer says which version gave it: the ``X-Model-Version`` response header on
  ``/predict`` and ``/v2`` (and the body's ``model.version`` / ``model_version``), gRPC
  initial metadata ``x-model-version`` beside the response's ``model_version``.
"""

from __future__ import annotations

from collections.abc import Mapping

from service.dataplane.served import ServingModel
from service.dataplane.traffic import Route
from service.errors import BadRequest

MODEL_VERSION_HEADER = "X-Model-Version"
CLIENT_KEY_HEADER = "X-Client-Key"
#: A client key is hashed, never stored; longer ones are refused rather than hashed whole.
MAX_KEY_CHARS = 256


def route_from(headers: Mapping[str, str], version: str | None = None) -> Route:
    """The route of a request with these headers (HTTP headers, or gRPC metadata with
    lower-case keys) and the protocol's own model version, if any."""
    pin = (headers.get(MODEL_VERSION_HEADER.lower()) or "").strip() or None
    if version and pin and pin != version:
        raise BadRequest(
            f"the request names version {version} and {MODEL_VERSION_HEADER}: {pin}; "
            "name one version"
        )
    key = headers.get(CLIENT_KEY_HEADER.lower()) or None
    if key is not None and len(key) > MAX_KEY_CHARS:
        raise BadRequest(f"{CLIENT_KEY_HEADER} is over {MAX_KEY_CHARS} characters")
    return Route(version or pin, key)


def answered_by(model: ServingModel) -> dict[str, str]:
    """The response header that says which version answered."""
    return {MODEL_VERSION_HEADER: model.info["version"]}
