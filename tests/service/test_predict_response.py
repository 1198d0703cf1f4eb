"""/predict's response is built as plain data and serialised by pydantic-core directly:
it must stay exactly what FastAPI sent when it validated and dumped ``PredictResponse``."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import TypeAdapter

from service.dataplane.images import ImageFile, PreparedImage
from service.frontends.api.predict import PredictResponse, build_response, render_json

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MODEL = SimpleNamespace(
    class_names=CLASSES,
    info={"name": "seednet", "version": "1", "backend": "torchscript", "device": "cuda"},
)
FASTAPI = TypeAdapter(PredictResponse)  # what FastAPI does with response_model=PredictResponse


def case(rng: np.random.Generator, n: int, kind: str):
    scale = {"spread": 1.0, "confident": 30.0, "uniform": 0.0, "ties": 5.0}[kind]
    logits = rng.normal(scale=scale, size=(n, 10))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs = (probs / probs.sum(1, keepdims=True)).astype(np.float32)
    if kind == "ties":
        probs = np.round(probs, 2).astype(np.float32)
    att = rng.random((n, 7, 2)).astype(np.float32)
    uploads = [ImageFile(None if i % 3 == 0 else f'cat-{i}-é猫".jpg', b"") for i in range(n)]
    pixels = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    prepared = [PreparedImage(pixels[i], (640 + i, 480), "JPEG", "RGB") for i in range(n)]
    return uploads, prepared, probs, att


@pytest.mark.parametrize("kind", ["spread", "confident", "uniform", "ties"])
@pytest.mark.parametrize("n", [1, 7, 64])
def test_response_bytes_are_what_fastapi_sent_for_the_validated_model(kind, n):
    rng = np.random.default_rng(n * 31 + len(kind))
    uploads, prepared, probs, att = case(rng, n, kind)
    if kind == "spread":
        probs[0, 3] = np.nan  # serialised as null, as before
    for top_k, include_input in [(1, False), (3, True), (10, False)]:
        payload = build_response(MODEL, uploads, prepared, probs, att, top_k, include_input)
        expected = FASTAPI.dump_json(FASTAPI.validate_python(payload), by_alias=True)
        assert render_json(payload) == expected
        for row, pred in zip(probs, payload["predictions"], strict=True):  # per-row order
            assert [t["label"] for t in pred["top_k"]] == [
                CLASSES[j] for j in np.argsort(-row)[:top_k]
            ]


def test_model_info_keys_beyond_the_schema_are_not_sent():
    rng = np.random.default_rng(0)
    model = SimpleNamespace(class_names=CLASSES, info={**MODEL.info, "extra": "x"})
    payload = build_response(model, *case(rng, 2, "spread"), 3, False)
    assert payload["model"] == MODEL.info
