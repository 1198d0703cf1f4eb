"""POST /explain: images in, the prediction and where the model looks (maps per block).

The body, its limits and its errors are ``/predict``'s (``bodies.read_uploads``, the data
plane's decode pool); the maps come from the explanation worker, on its own queue
(``service.dataplane.explaining``), so explanations never wait in, or slow, the model
thread that answers ``/predict``. What the maps are and how faithful each one is:
docs/explanations.md.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field

from service.dataplane.explaining import Explanation, WireOptions, parse_blocks, parse_target
from service.dataplane.images import ImageFile
from service.errors import ExplainArgumentError, ExplanationsOff, ServiceError
from service.frontends.api.predict import (
    ERROR_RESPONSES,
    MULTIPART_BODY,
    ModelRef,
    render_json,
)
from service.frontends.http.bodies import has_unread_body, read_uploads
from service.frontends.http.deps import ModelDep, PlaneDep, SettingsDep, State

router = APIRouter(tags=["explain"])
PROTOCOL = "rest"  # the metrics' protocol label of the JSON API
ENCODINGS = ("png", "f16")
BRANCH_MAPS = ("gradcam", "strength")


class MapImage(BaseModel):
    """One 32x32 map with values in [0, 1], in the encodings asked for."""

    png: str | None = Field(
        None,
        description="PNG data URL, 32x32: the value through matplotlib's inferno colour map "
        "(dark = low, yellow = high), alpha = value, for drawing over the model input",
    )
    f16: str | None = Field(
        None,
        description="base64 of the 32x32 values as little-endian float16, row-major (2,048 bytes)",
    )


class BranchMaps(BaseModel):
    branch: int = Field(description="1-based branch of the block")
    attention: float = Field(description="the branch's softmax weight for this image")
    gradcam_share: float = Field(
        description="the branch's share of the block's positive Grad-CAM evidence for the "
        "class (the branches of a block sum to 1): which branch carries this class"
    )
    strength_share: float = Field(
        description="the branch's share of the block's weighted output (L2 norm), any class"
    )
    gradcam: MapImage | None = Field(
        None, description="Grad-CAM restricted to the branch (branch_maps=gradcam)"
    )
    strength: MapImage | None = Field(
        None,
        description="where the branch's attention-weighted output is strong, whatever the "
        "class (branch_maps=strength)",
    )


class BlockMaps(BaseModel):
    block: int = Field(description="1-based intermediate block, network order")
    attention: list[float] = Field(description="the block's branch weights (sum 1)")
    gradcam: MapImage = Field(description="Grad-CAM at the block's output, for the class")
    branches: list[BranchMaps]


class MacroBlockMaps(BaseModel):
    blocks: list[int] = Field(description="the intermediate blocks of the macro block")
    gradcam: MapImage = Field(description="Grad-CAM at the macro block's output")


class ExplainedPrediction(BaseModel):
    label: str = Field(examples=["cat"])
    confidence: float
    probabilities: dict[str, float] = Field(description="all classes, summing to 1")


class ImageExplanation(BaseModel):
    filename: str | None
    original_size: tuple[int, int] = Field(description="width, height of the upload")
    prediction: ExplainedPrediction = Field(
        description="the class the explaining (eager) model predicts, as /predict would"
    )
    target: int = Field(description="the class explained: index (the predicted one unless asked)")
    label: str = Field(description="the class explained: label")
    probability: float = Field(description="the explained class's probability")
    map_shape: list[int] = Field(description="height, width of every map: [32, 32]")
    encodings: list[str]
    blocks: list[BlockMaps] = Field(description="the blocks asked for, network order")
    macro_blocks: list[MacroBlockMaps] = Field(
        description="residual macro blocks (empty with macro=false); the last one's Grad-CAM "
        "is the most faithful map measured (docs/explanations.md)"
    )
    model_input: str | None = Field(
        None, description="the 32x32 image the model saw, as a PNG data URL (include_input)"
    )


class ExplainResponse(BaseModel):
    model: ModelRef = Field(
        description="the version explained; backend and device are the explainer's (eager "
        "PyTorch on the CPU: gradients)"
    )
    explanations: list[ImageExplanation]


EXPLAIN_ERRORS = {
    **ERROR_RESPONSES,
    404: {"description": "explanations are off on this server (SEEDNET_EXPLAIN=off)"},
    422: {
        "description": "empty, truncated or corrupt file, a missing field, or a class, "
        "block, encoding or branch map that does not exist"
    },
    429: {"description": "the explanation queue is full (Retry-After); /predict is not"},
    503: {
        "description": "the model is still loading, or the explanation was not done within "
        "SEEDNET_EXPLAIN_TIMEOUT_S (Retry-After)"
    },
}


def _choices(value: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if chosen == ("none",) and what == "branch_maps":
        return ()
    unknown = [c for c in chosen if c not in allowed]
    if unknown or (not chosen and what == "encoding"):
        raise ExplainArgumentError(
            f"{what} must be one or more of {', '.join(allowed)} separated by commas, "
            f"got {value[:64]!r}"
        )
    return chosen


@router.post(
    "/explain",
    response_model=ExplainResponse,
    responses=EXPLAIN_ERRORS,
    openapi_extra=MULTIPART_BODY,
    summary="Where the model looks: Grad-CAM per block and per-branch maps for one image "
    "(field `file`) or several (field `files`)",
)
async def explain(
    request: Request,
    state: State,
    plane: PlaneDep,
    settings: SettingsDep,
    model: ModelDep,  # 503 before reading a body while no model is loaded
    class_: Annotated[
        str | None,
        Query(
            alias="class",
            description="the class to explain, by label (`cat`) or index (`3`); default: "
            "each image's predicted class",
        ),
    ] = None,
    blocks: Annotated[
        str | None,
        Query(description="block numbers separated by commas (`6,7`), or `all` (default)"),
    ] = None,
    macro: Annotated[bool, Query(description="include the macro blocks' Grad-CAM")] = True,
    encoding: Annotated[
        str, Query(description="`png` (data URLs), `f16` (base64 float16) or `png,f16`")
    ] = "png",
    branch_maps: Annotated[
        str,
        Query(
            description="per-branch maps to send: `gradcam`, `strength`, both (default) or "
            "`none` (the shares are always sent)"
        ),
    ] = "gradcam,strength",
    include_input: Annotated[
        bool, Query(description="return the 32x32 model input as PNG")
    ] = False,
) -> Response:
    explanations = state.explanations
    # Every argument is checked, and the queue asked, before the body is read; a refusal
    # closes the connection rather than reading a body nobody will use.
    try:
        if explanations is None or not explanations.enabled:
            raise ExplanationsOff()
        target = parse_target(class_, model.class_names)
        chosen = parse_blocks(blocks, model.attention_dims[0])
        wire = WireOptions(
            encodings=_choices(encoding, ENCODINGS, "encoding"),
            branch_maps=_choices(branch_maps, BRANCH_MAPS, "branch_maps"),
            include_input=include_input,
        )
        explanations.admit()
    except ServiceError as exc:
        exc.close = has_unread_body(request)
        raise
    t0 = time.perf_counter()
    uploads = await read_uploads(request, settings)
    plane.observe("read_body", PROTOCOL, time.perf_counter() - t0)
    result = await explanations.explain(
        protocol=PROTOCOL,
        files=uploads,
        target=target,
        blocks=chosen,
        macro=macro,
        wire=wire,
        model=model,
    )
    # (not a "serialise" stage: the maps were encoded by the worker, and these large
    # bodies would skew the JSON API's figure, which is /predict's)
    body = render_json(build_response(result, uploads))
    return Response(body, media_type="application/json")  # (FastAPI skips response_model)


def build_response(explanation: Explanation, uploads: list[ImageFile]) -> dict[str, Any]:
    """The answer as plain data in the shape of :class:`ExplainResponse`."""
    model = explanation.model
    classes = model.class_names
    arrays, wire = explanation.result.arrays, explanation.result.wire or []
    probabilities = np.asarray(arrays["probabilities"]).tolist()
    images = explanation.images or []
    items = []
    for i, (upload, maps) in enumerate(zip(uploads, wire, strict=True)):
        row = probabilities[i]
        best = int(np.argmax(row))
        target = int(maps["target"])
        items.append(
            {
                "filename": upload.name,
                "original_size": images[i].original_size if images else (32, 32),
                "prediction": {
                    "label": classes[best],
                    "confidence": row[best],
                    "probabilities": dict(zip(classes, row, strict=True)),
                },
                "target": target,
                "label": maps["label"],
                "probability": row[target],
                "map_shape": maps["map_shape"],
                "encodings": maps["encodings"],
                "blocks": maps["blocks"],
                "macro_blocks": maps["macro_blocks"],
                "model_input": maps.get("model_input"),
            }
        )
    ref = {"name": model.info["name"], "version": model.info["version"]}
    return {"model": ref | {"backend": "eager", "device": "cpu"}, "explanations": items}
