"""POST /predict: images in, class probabilities and per-block attention out."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
from fastapi import APIRouter, Query, Request
from PIL import Image
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import ApiError
from service.preprocessing import (
    FileTooLargeError,
    ImageLimits,
    PreparedImage,
    PreprocessingError,
    preprocess,
)
from service.state import get_state

router = APIRouter(tags=["predict"])

MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries allowed on top of the files


class ModelRef(BaseModel):
    name: str = Field(examples=["seednet"])
    version: str = Field(examples=["1"])
    backend: str = Field(examples=["torchscript"])
    device: str = Field(examples=["cuda"])


class TopK(BaseModel):
    label: str
    probability: float


class BlockAttention(BaseModel):
    block: int = Field(description="1-based position of the intermediate block in the network")
    weights: list[float] = Field(description="softmax weights of the block's branches (sum 1)")


class Prediction(BaseModel):
    filename: str | None
    label: str = Field(examples=["cat"])
    confidence: float = Field(examples=[0.93])
    probabilities: dict[str, float] = Field(description="all classes, summing to 1")
    top_k: list[TopK]
    attention: list[BlockAttention] = Field(description="one entry per block, network order")
    original_size: tuple[int, int] = Field(description="width, height of the upload")
    model_input: str | None = Field(
        None, description="the 32x32 image the model saw, as a PNG data URL (include_input)"
    )


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[Prediction]


ERROR_EXAMPLE = {
    "error": {
        "code": "unsupported_media_type",
        "status": 415,
        "message": "the file is not an image in a supported format",
    }
}
ERROR_RESPONSES = {
    status: {"description": what, "content": {"application/json": {"example": ERROR_EXAMPLE}}}
    for status, what in [
        (413, "a file, the image's pixels or the number of images is over the limit"),
        (415, "not an image, or a format other than JPEG, PNG, WebP, BMP, GIF"),
        (422, "empty, truncated or corrupt file, or a missing field"),
        (503, "the model is still loading"),
    ]
}
MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "one image"},
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "several images",
                        },
                    },
                }
            }
        },
    }
}


async def _read_limited(upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise FileTooLargeError(
            f"{upload.filename or 'the file'} is larger than the limit of {limit} bytes"
        )
    return data


def _png_data_url(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array.transpose(1, 2, 0)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=MULTIPART_BODY,
    summary="Classify one image (field `file`) or several (field `files`)",
)
async def predict(
    request: Request,
    top_k: int = Query(3, ge=1, le=10, description="how many top classes to list"),
    include_input: bool = Query(False, description="return the 32x32 model input as PNG"),
) -> PredictResponse:
    state = get_state(request)
    s = state.settings
    state.require_model()
    declared = request.headers.get("content-length")
    body_limit = s.max_images_per_request * s.max_upload_bytes + MULTIPART_OVERHEAD
    if declared and declared.isdigit() and int(declared) > body_limit:
        raise ApiError(
            413,
            "payload_too_large",
            f"the request body is {declared} bytes; at most {body_limit} accepted",
        )
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
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
        uploads = [v for key in ("file", "files") for v in form.getlist(key)]
        if any(not isinstance(u, UploadFile) for u in uploads):
            raise ApiError(
                422, "invalid_request", "'file' and 'files' must be file uploads, not text fields"
            )
        if not uploads:
            raise ApiError(
                422,
                "missing_file",
                "no image found: send it in a multipart field named 'file' (or several in 'files')",
            )
        if len(uploads) > s.max_images_per_request:
            raise ApiError(
                413,
                "too_many_images",
                f"{len(uploads)} images sent; at most {s.max_images_per_request} per request",
            )
        blobs = [await _read_limited(u, s.max_upload_bytes) for u in uploads]
        names = [u.filename for u in uploads]
    finally:
        await form.close()

    # Decoding is CPU work: do it off the event loop.
    prepared: list[PreparedImage] = await asyncio.to_thread(
        lambda: [_prepare(b, n, state.limits) for b, n in zip(blobs, names, strict=True)]
    )
    images = np.stack([p.array for p in prepared])
    (probs, attention), model = await state.batcher.submit(images)
    classes = model.class_names
    predictions = []
    for i, p in enumerate(prepared):
        row = probs[i]
        order = np.argsort(-row)
        predictions.append(
            Prediction(
                filename=names[i],
                label=classes[int(order[0])],
                confidence=float(row[order[0]]),
                probabilities={c: float(v) for c, v in zip(classes, row, strict=True)},
                top_k=[
                    TopK(label=classes[int(j)], probability=float(row[j])) for j in order[:top_k]
                ],
                attention=[
                    BlockAttention(block=b + 1, weights=[float(w) for w in attention[i, b]])
                    for b in range(attention.shape[1])
                ],
                original_size=p.original_size,
                model_input=_png_data_url(p.array) if include_input else None,
            )
        )
    return PredictResponse(model=ModelRef(**model.info), predictions=predictions)


def _prepare(data: bytes, name: str | None, limits: ImageLimits) -> PreparedImage:
    try:
        return preprocess(data, limits)
    except PreprocessingError as exc:
        if name:  # name the file, so a person sending several knows which one to fix
            raise type(exc)(f"{name}: {exc.message}") from None
        raise
