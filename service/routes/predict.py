"""POST /predict: images in, class probabilities and per-block attention out."""

from __future__ import annotations

import base64
import io
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from PIL import Image
from pydantic import BaseModel, Field

from service.decoding import decode_uploads
from service.deps import ModelDep, State
from service.preprocessing import PreparedImage
from service.serving import ServingModel
from service.uploads import Upload, read_uploads

router = APIRouter(tags=["predict"])


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
    state: State,
    _model: ModelDep,  # 503 before reading a body while no model is loaded
    top_k: Annotated[int, Query(ge=1, le=10, description="how many top classes to list")] = 3,
    include_input: Annotated[
        bool, Query(description="return the 32x32 model input as PNG")
    ] = False,
) -> Response:
    stage = state.metrics.observe_stage  # where the time goes (queue_wait, model: batcher)
    t0 = time.perf_counter()
    uploads = await read_uploads(request, state.settings)
    t1 = time.perf_counter()
    stage("read_body", t1 - t0)
    # CPU work on the bounded decode pool, within the request's pixel budget.
    prepared = await decode_uploads(state.decoder, uploads, state.limits)
    stage("decode", time.perf_counter() - t1)
    (probs, attention), model = await state.batcher.submit(np.stack([p.array for p in prepared]))
    t2 = time.perf_counter()
    body = build_response(model, uploads, prepared, probs, attention, top_k, include_input)
    # Built from validated parts already: send the JSON as it is (no second validation).
    response = Response(body.model_dump_json().encode(), media_type="application/json")
    stage("serialise", time.perf_counter() - t2)
    return response


def build_response(
    model: ServingModel,
    uploads: list[Upload],
    prepared: list[PreparedImage],
    probs: np.ndarray,
    attention: np.ndarray,
    top_k: int,
    include_input: bool,
) -> PredictResponse:
    """One prediction per image, labelled by the model that computed it."""
    classes = model.class_names
    predictions = []
    for i, (upload, p) in enumerate(zip(uploads, prepared, strict=True)):
        row = probs[i]
        order = np.argsort(-row)
        predictions.append(
            Prediction(
                filename=upload.filename,
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
