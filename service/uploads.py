"""Reading the images of a multipart upload, within the service's limits.

Only bytes here: decoding is ``service.preprocessing``'s job.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.config import Settings
from service.errors import ApiError
from service.preprocessing import FileTooLargeError

MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries allowed on top of the files
FIELDS = ("file", "files")


@dataclass(frozen=True)
class Upload:
    filename: str | None
    data: bytes


async def read_uploads(request: Request, s: Settings) -> list[Upload]:
    """The files of fields ``file``/``files``; 413/422 ApiErrors for what breaks a limit."""
    declared = request.headers.get("content-length")
    body_limit = s.max_images_per_request * s.max_upload_bytes + MULTIPART_OVERHEAD
    if declared and declared.isdigit() and int(declared) > body_limit:
        raise ApiError(
            413,
            "payload_too_large",
            f"the request body is {declared} bytes; at most {body_limit} accepted",
        )
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(
            422,
            "invalid_request",
            "send the images as multipart/form-data in a field 'file' or 'files'",
        )
    try:
        form = await request.form(max_files=s.max_images_per_request, max_fields=100)
    except StarletteHTTPException as exc:
        detail = str(exc.detail)
        if "Too many files" in detail:
            raise ApiError(
                413, "too_many_images", f"at most {s.max_images_per_request} images per request"
            ) from None
        raise ApiError(
            422, "invalid_multipart", f"the multipart body is malformed: {detail}"
        ) from None
    try:
        files = [v for key in FIELDS for v in form.getlist(key)]
        if any(not isinstance(f, UploadFile) for f in files):
            raise ApiError(
                422, "invalid_request", "'file' and 'files' must be file uploads, not text fields"
            )
        if not files:
            raise ApiError(
                422,
                "missing_file",
                "no image found: send it in a multipart field named 'file' (or several in 'files')",
            )
        if len(files) > s.max_images_per_request:
            raise ApiError(
                413,
                "too_many_images",
                f"{len(files)} images sent; at most {s.max_images_per_request} per request",
            )
        return [Upload(f.filename, await _read_limited(f, s.max_upload_bytes)) for f in files]
    finally:
        await form.close()


async def _read_limited(upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise FileTooLargeError(
            f"{upload.filename or 'the file'} is larger than the limit of {limit} bytes"
        )
    return data
