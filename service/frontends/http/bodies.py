"""Reading request bodies within the service's limits, as they arrive.

Only bytes here: decoding is the data plane's job (``service.dataplane``).

The body is read straight from the ASGI receive channel with a running byte count and a
deadline, never through Starlette's ``request.form()`` (which spools a whole upload to
a temporary file before anyone can look at its size). Multipart bodies are fed to
python-multipart's streaming parser chunk by chunk, so every limit is checked while
reading and the first byte over one ends the request:

- ``Content-Length`` over ``max_request_bytes``: 413 before a byte is read;
- more bytes than that arriving (chunked, or a lying Content-Length): 413 at once;
- a file over ``max_upload_bytes``, or one image too many: 413 at once;
- the body not complete within ``timeout_body`` seconds (a stalled or trickling
  client): 408.

Nothing touches the disk; a request holds at most ``max_request_bytes`` in memory. An
error sent before the whole body arrived says ``Connection: close``, so uvicorn closes
the connection instead of reading (and discarding) the rest of a huge body.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from service.config import Settings
from service.dataplane.images import ImageFile
from service.errors import (
    BadRequest,
    FileTooLargeError,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
)

FIELDS = ("file", "files")
ADMIN_BODY_BYTES = 4096  # {"version": "12", "alias": "production"} is 40 bytes
MAX_PARTS = 256  # text fields and files of other names count too
MAX_PART_HEADER_BYTES = 8192  # all headers of one part


def declared_length(request: Request) -> int | None:
    """Content-Length as a number (None without one); 400 when it is not a number."""
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise BadRequest("Content-Length is not a number", close=True)
    return int(value)


def has_unread_body(request: Request) -> bool:
    """Whether the client announced a body (one this service may not read)."""
    length = request.headers.get("content-length", "0").strip()
    return "transfer-encoding" in request.headers or length not in ("", "0")


async def receive_body(request: Request, max_bytes: int, timeout: float) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive; 413 past ``max_bytes``, 408 after ``timeout`` s."""
    declared = declared_length(request)
    if declared is not None and declared > max_bytes:
        raise PayloadTooLarge(
            f"the request body is {declared} bytes; at most {max_bytes} accepted", close=True
        )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    received = 0
    while True:
        try:
            message = await asyncio.wait_for(request.receive(), max(deadline - loop.time(), 0))
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive within {timeout:g} s ({received} bytes received)",
                close=True,
            ) from None
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > max_bytes:
            raise PayloadTooLarge(
                f"the request body is over the limit of {max_bytes} bytes", close=True
            )
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


@dataclass
class _Form:
    """python-multipart callbacks that keep the image parts within the limits."""

    max_images: int
    max_file_bytes: int
    uploads: list[ImageFile] = field(default_factory=list)
    ended: bool = False
    parts: int = 0
    _headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    _field: bytes = b""
    _value: bytes = b""
    _header_bytes: int = 0
    _filename: str | None = None
    _keep: bool = False
    _chunks: list[bytes] = field(default_factory=list)
    _size: int = 0

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": self.header_field,
            "on_header_value": self.header_value,
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
            "on_end": self.end,
        }

    def part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise PayloadTooLarge(f"at most {MAX_PARTS} multipart parts", code="too_many_parts")
        self._headers, self._header_bytes = [], 0
        self._field = self._value = b""
        self._filename, self._keep, self._chunks, self._size = None, False, [], 0

    def _count_header(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise PayloadTooLarge(f"a part's headers exceed {MAX_PART_HEADER_BYTES} bytes")

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._value += data[start:end]

    def header_end(self) -> None:
        self._headers.append((self._field.lower(), self._value))
        self._field = self._value = b""

    def headers_finished(self) -> None:
        disposition = dict(self._headers).get(b"content-disposition", b"")
        _, options = parse_options_header(disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name not in FIELDS:
            return  # another field: counted against the body limit, not kept
        raw_filename = options.get(b"filename")
        if raw_filename is None:
            raise InvalidRequest("'file' and 'files' must be file uploads, not text fields")
        if len(self.uploads) >= self.max_images:
            raise PayloadTooLarge(
                f"at most {self.max_images} images per request", code="too_many_images"
            )
        self._filename = raw_filename.decode("utf-8", "replace")
        self._keep = True

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._keep:
            return
        self._size += end - start
        if self._size > self.max_file_bytes:
            raise FileTooLargeError(
                f"{self._filename or 'the file'} is larger than the limit of "
                f"{self.max_file_bytes} bytes"
            )
        self._chunks.append(data[start:end])

    def part_end(self) -> None:
        if self._keep:
            self.uploads.append(ImageFile(self._filename, b"".join(self._chunks)))
            self._keep, self._chunks = False, []

    def end(self) -> None:
        self.ended = True


async def read_uploads(request: Request, s: Settings) -> list[ImageFile]:
    """The files of fields ``file``/``files``; 408/413/422 errors for what breaks a limit."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise InvalidRequest(
            "send the images as multipart/form-data in a field 'file' or 'files'",
            close=has_unread_body(request),
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise InvalidRequest(
            "the multipart Content-Type has no boundary", code="invalid_multipart", close=True
        )
    form = _Form(max_images=s.max_images_per_request, max_file_bytes=s.max_upload_bytes)
    parser = MultipartParser(boundary, form.callbacks())
    try:
        async for chunk in receive_body(request, s.max_request_bytes, s.timeout_body):
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidRequest(
            f"the multipart body is malformed: {exc}", code="invalid_multipart", close=True
        ) from None
    except ServiceError as exc:  # mid-body (a file too large, one image too many): close
        exc.close = True
        raise
    if not form.ended:
        raise InvalidRequest(
            "the multipart body ends before its closing boundary", code="invalid_multipart"
        )
    if not form.uploads:
        raise InvalidRequest(
            "no image found: send it in a multipart field named 'file' (or several in 'files')",
            code="missing_file",
        )
    return form.uploads


async def read_admin_json(request: Request, s: Settings) -> object:
    """A small JSON body (at most :data:`ADMIN_BODY_BYTES`) of an admin route."""
    body = b"".join(
        [chunk async for chunk in receive_body(request, ADMIN_BODY_BYTES, s.timeout_body)]
    )
    try:
        return json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
