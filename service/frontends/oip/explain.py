"""The inference protocol's ``explain`` extension, for REST ``/v2`` and gRPC alike.

A request that names any of the explain outputs (``gradcam``, ``macro_gradcam``,
``branch_gradcam``, ``branch_gradcam_share``, ``branch_strength``,
``branch_strength_share``, ``explained_class``; see
``codec.signature.explain_outputs``) gets them beside the usual ones, computed by the
explanation worker on its own queue (``service.dataplane.explaining``): the same maps as
``POST /explain``, as FP32 tensors. Request parameters (REST ``"parameters"``, gRPC
``parameters``, tritonclient's ``parameters=``):

- ``target``: the class to explain, by index or label (default: each image's predicted
  class);
- ``blocks``: block numbers, ``"6,7"`` (or an integer, or a JSON list), default all; the
  maps' block dimension follows them in increasing order.

Errors are the protocol's: a bad parameter is 400 / ``INVALID_ARGUMENT``, a full
explanation queue 429 / ``RESOURCE_EXHAUSTED`` and a missed deadline 503 /
``UNAVAILABLE``, both with ``retry-after``; with explanations off, naming an explain
output is a 400 that says so. A request that names no explain output never touches the
explanation queue.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.dataplane.explaining import parse_blocks, parse_target
from service.dataplane.images import ImageFile
from service.dataplane.inference import Inference
from service.dataplane.traffic import NO_ROUTE, Route
from service.errors import ExplainArgumentError, ProtocolError
from service.frontends.oip.codec.request import InferRequest
from service.frontends.oip.codec.signature import EXPLAIN_SOURCES, explain_outputs
from service.frontends.oip.common import run_inference
from service.state import ServiceState

OUTPUTS = tuple(t.name for t in explain_outputs())


def _argument(value: Any, parse, *args) -> Any:
    try:
        return parse(value, *args)
    except ExplainArgumentError as exc:
        raise ProtocolError(f"explain: {exc.message}") from None


async def infer(
    state: ServiceState, request: InferRequest, protocol: str, route: Route = NO_ROUTE
) -> Inference:
    """``request`` through the data plane, and through the explanation queue when it names
    an explain output (one decode for both); ``route``: the rollout's pin or client key
    (an explained request is answered by the serving version)."""
    plane = state.plane
    assert plane is not None  # (the front ends check readiness first)
    wanted = [o.name for o in request.outputs if o.name in OUTPUTS]
    if not wanted:
        return await run_inference(plane, request, protocol, route)
    explanations = state.explanations
    if explanations is None or not explanations.enabled:
        raise ProtocolError(
            f"output {wanted[0]!r} belongs to the explain extension, which is off on this "
            "server (SEEDNET_EXPLAIN=off)"
        )
    model = plane.current_model()
    target = _argument(request.parameters.get("target"), parse_target, model.class_names)
    blocks = _argument(request.parameters.get("blocks"), parse_blocks, model.attention_dims[0])
    explanations.admit()  # 429 before decoding anything
    images = None
    if request.images is not None:
        pixels = np.asarray(request.images)
    else:
        files = [ImageFile(f"image_bytes[{i}]", f) for i, f in enumerate(request.image_bytes or [])]
        images = await plane.decode(files, protocol)
        pixels = np.stack([p.array for p in images])
    outputs: dict[str, np.ndarray] = {}
    if any(o.name not in OUTPUTS for o in request.outputs):
        result = await plane.infer(pixels=pixels, protocol=protocol, model=model)
        outputs, model = dict(result.outputs), result.model
    explanation = await explanations.explain(
        protocol=protocol,
        pixels=pixels,
        target=target,
        blocks=blocks,
        macro="macro_gradcam" in wanted,
        model=model,
    )
    arrays = explanation.result.arrays
    for name in wanted:
        outputs[name] = arrays[EXPLAIN_SOURCES.get(name, name)]
    return Inference(outputs, model, images)
