"""Naive FastAPI peer: one model call per request, no batching.

A plain ``def`` endpoint, so FastAPI runs it in its thread pool (40 threads) and requests
overlap only as far as torch's intra-op threads and the GIL allow. torch keeps its default
thread count. ``GET /health`` answers once the model is loaded (it is loaded at start).

    python fastapi_app.py --model models/seednet/1/model.ts \
        --manifest models/seednet/1/manifest.json --port 8101
"""

from __future__ import annotations

import argparse
from typing import Annotated

import peer_common
import uvicorn
from fastapi import FastAPI, File, UploadFile


def create_app(model_path: str, manifest: str) -> FastAPI:
    model = peer_common.load_model(model_path)
    class_names = peer_common.load_class_names(manifest)
    app = FastAPI(title="SeedNet naive peer")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/predict")
    def predict(file: Annotated[UploadFile, File()]) -> dict:
        batch = peer_common.decode(file.file.read())[None]
        probs, attention = peer_common.run_model(model, batch)
        return peer_common.encode(probs[0], attention[0], class_names)

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args()
    uvicorn.run(
        create_app(a.model, a.manifest),
        host=a.host,
        port=a.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
