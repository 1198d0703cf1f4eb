"""Every failure the service answers with, and the one table that says how.

Errors are raised where they happen (the registry, a model that cannot load, an image
that cannot be decoded, a full queue, a malformed tensor) and know nothing of a wire
protocol. :data:`FAILURES` maps each to what every protocol needs: the HTTP status, the
gRPC status code, the machine-readable code, whether to send ``Retry-After``, and whether
the client (or the load it sends) caused it, in which case no traceback is logged. The
JSON API, the inference protocol's REST routes and its gRPC server each render from
:func:`failure_of`; none keeps a table of its own. Nothing here imports a web framework
or gRPC.

The service's own errors derive from :class:`ServiceError`; registry and export errors
come from the layers below and are mapped here too. An exception that is in no row is a
server fault: HTTP 500 / gRPC ``INTERNAL``, logged with its traceback, and its message is
never shown to the client.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from registry.errors import (
    ConflictError,
    IntegrityError,
    InvalidNameError,
    InvalidRolloutError,
    MetadataError,
    NotFoundError,
    RegistryError,
    StorageError,
)
from seednet.errors import ExportError

log = logging.getLogger("seednet.errors")

#: The longest message a client is sent: a hostile request (a 50 MB shape list, say) must
#: not be echoed back whole.
MAX_MESSAGE_CHARS = 1000


class ServiceError(Exception):
    """An error of the service with a stable ``code`` and a sentence for a person.

    ``code`` overrides the class's code for this instance (``too_many_images`` is a
    :class:`PayloadTooLarge`); ``close`` asks an HTTP front end to close the connection
    (the error was sent before the whole body arrived); ``retry_after`` is seconds.
    """

    code = "error"
    default_message = "the request failed"

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        close: bool = False,
        retry_after: int | None = None,
    ) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)
        if code is not None:
            self.code = code
        self.close = close
        self.retry_after = retry_after


# -- the request ----------------------------------------------------------------------


class BadRequest(ServiceError):
    """Malformed request: a header, an encoding, a body that is not what it says."""

    code = "bad_request"


class ProtocolError(BadRequest):
    """A request that breaks the inference protocol or the model's signature."""

    code = "invalid_inference_request"


class InvalidRequest(ServiceError):
    """A well-formed request with a missing or invalid field (the JSON API's 422)."""

    code = "invalid_request"


class Unauthorized(ServiceError):
    code = "unauthorized"


class Forbidden(ServiceError):
    code = "forbidden"


class PayloadTooLarge(ServiceError):
    code = "payload_too_large"


class RequestTimeout(ServiceError):
    code = "request_timeout"


class ModelNotFound(ServiceError):
    """A model name or version the registry does not have (inference protocol)."""

    code = "model_not_found"


class ModelNotServed(BadRequest):
    """A model version the registry has but this service does not serve."""

    code = "model_not_served"


# -- images (the decoding pipeline, service.dataplane.images) --------------------------


class ImageError(ServiceError):
    """The upload cannot be turned into a model input."""

    code = "invalid_image"
    default_message = "the image cannot be used"


class EmptyFileError(ImageError):
    code = "empty_file"
    default_message = "the uploaded file is empty"


class FileTooLargeError(ImageError):
    code = "file_too_large"
    default_message = "the uploaded file is too large"


class TooManyPixelsError(ImageError):
    code = "too_many_pixels"
    default_message = "the image has too many pixels"


class UnsupportedImageError(ImageError):
    code = "unsupported_media_type"
    default_message = "not a supported image"


class CorruptImageError(ImageError):
    code = "corrupt_image"
    default_message = "the image data is truncated or corrupt"


# -- the model and its capacity --------------------------------------------------------


class NotReady(ServiceError):
    code = "not_ready"
    default_message = "the model is still loading; retry shortly"


class Overloaded(ServiceError):
    """Admission control: the request cannot be served in time; refused before it waits."""

    code = "overloaded"


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its batch started; it was not computed."""

    code = "deadline_exceeded"


class ModelLoadError(ServiceError):
    """The requested model could not be loaded (unknown backend, no device, broken file)."""

    code = "model_load_failed"


# -- explanations (service.dataplane.explaining) ---------------------------------------


class ExplainArgumentError(InvalidRequest):
    """A class or block number an explanation cannot be made for."""

    code = "invalid_explain_argument"


class ExplanationsOff(ServiceError):
    """This server does not explain (``SEEDNET_EXPLAIN=off``)."""

    code = "explanations_off"
    default_message = "explanations are turned off on this server (SEEDNET_EXPLAIN=off)"


class ExplainQueueFull(Overloaded):
    """The explanation queue is full; /predict is not affected."""

    code = "explain_queue_full"


class ExplainTimeout(DeadlineExceeded):
    """An explanation was not done within SEEDNET_EXPLAIN_TIMEOUT_S."""

    code = "explain_timeout"


class ExplainerUnavailable(ServiceError):
    """The explanation worker failed (it is restarted for the next request)."""

    code = "explainer_unavailable"


@dataclass(frozen=True)
class Failure:
    """How one kind of error is answered on every protocol."""

    http: int
    grpc: str  # a grpc.StatusCode name
    client: bool = True  # caused by the request or the load: no traceback in the log
    retry: bool = False  # send Retry-After (HTTP header, gRPC trailing metadata)


SERVER_FAULT = Failure(500, "INTERNAL", client=False)

# Most specific first: the first class an error is an instance of wins.
FAILURES: tuple[tuple[type[BaseException], Failure], ...] = (
    (ProtocolError, Failure(400, "INVALID_ARGUMENT")),
    (BadRequest, Failure(400, "INVALID_ARGUMENT")),
    (Unauthorized, Failure(401, "UNAUTHENTICATED")),
    (Forbidden, Failure(403, "PERMISSION_DENIED")),
    (ModelNotFound, Failure(404, "NOT_FOUND")),
    (ExplanationsOff, Failure(404, "NOT_FOUND")),
    (NotFoundError, Failure(404, "NOT_FOUND")),
    (RequestTimeout, Failure(408, "DEADLINE_EXCEEDED")),
    (PayloadTooLarge, Failure(413, "INVALID_ARGUMENT")),
    (FileTooLargeError, Failure(413, "INVALID_ARGUMENT")),
    (TooManyPixelsError, Failure(413, "INVALID_ARGUMENT")),
    (UnsupportedImageError, Failure(415, "INVALID_ARGUMENT")),
    (EmptyFileError, Failure(422, "INVALID_ARGUMENT")),
    (CorruptImageError, Failure(422, "INVALID_ARGUMENT")),
    (ImageError, Failure(400, "INVALID_ARGUMENT")),
    (ExplainArgumentError, Failure(422, "INVALID_ARGUMENT")),
    (InvalidRequest, Failure(422, "INVALID_ARGUMENT")),
    (InvalidNameError, Failure(422, "INVALID_ARGUMENT")),
    (InvalidRolloutError, Failure(422, "INVALID_ARGUMENT")),
    (ExplainQueueFull, Failure(429, "RESOURCE_EXHAUSTED", retry=True)),
    (Overloaded, Failure(429, "RESOURCE_EXHAUSTED", retry=True)),
    (ExplainTimeout, Failure(503, "UNAVAILABLE", retry=True)),
    (DeadlineExceeded, Failure(503, "UNAVAILABLE", retry=True)),
    # The explanation worker died or could not build its model: logged, retried.
    (ExplainerUnavailable, Failure(503, "UNAVAILABLE", client=False, retry=True)),
    (NotReady, Failure(503, "UNAVAILABLE", retry=True)),
    (ConflictError, Failure(409, "ABORTED")),
    # The registry needs an operator (repair, a writable folder, a reachable store); the
    # loaded model keeps serving.
    (MetadataError, Failure(503, "UNAVAILABLE", client=False)),
    (StorageError, Failure(503, "UNAVAILABLE", client=False)),
    # The version's files differ from what was published, or it cannot be served here.
    (IntegrityError, Failure(409, "FAILED_PRECONDITION", client=False)),
    (RegistryError, Failure(409, "FAILED_PRECONDITION", client=False)),
    (ModelLoadError, Failure(409, "FAILED_PRECONDITION", client=False)),
    (ExportError, Failure(409, "FAILED_PRECONDITION", client=False)),
)


def failure_of(exc: BaseException) -> Failure:
    """The row of ``exc`` in :data:`FAILURES` (:data:`SERVER_FAULT` when none)."""
    for cls, failure in FAILURES:
        if isinstance(exc, cls):
            return failure
    return SERVER_FAULT


def error_code(exc: BaseException) -> str:
    """The machine-readable code of ``exc`` (``internal_error`` for a server fault)."""
    if failure_of(exc) is SERVER_FAULT:
        return "internal_error"
    return str(getattr(exc, "code", None) or "error")


def public_message(exc: BaseException) -> str:
    """What the client is told: the error's sentence on one line, at most
    :data:`MAX_MESSAGE_CHARS` characters; nothing of a server fault's internals."""
    if failure_of(exc) is SERVER_FAULT:
        return "the server failed to handle this request; it has been logged"
    text = " ".join(str(getattr(exc, "message", None) or exc).split())
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 1] + "…"
    return text


def retry_after(exc: BaseException) -> int | None:
    """Seconds to wait before retrying (only for rows that say so; at least 1)."""
    if not failure_of(exc).retry:
        return None
    return max(1, int(getattr(exc, "retry_after", None) or 1))


def log_failure(exc: BaseException, where: str) -> None:
    """A server fault is logged with its traceback, an operator's problem (a registry that
    needs repair, a version that cannot load) as one line; a client's or the load's not
    at all (the access log and the metrics have its status)."""
    failure = failure_of(exc)
    if failure is SERVER_FAULT:
        log.error("unexpected error in %s", where, exc_info=exc)
    elif not failure.client:
        log.warning("%s: %s", where, public_message(exc))
