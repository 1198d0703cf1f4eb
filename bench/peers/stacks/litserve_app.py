"""LitServe peer: dynamic batching (max 16 images, 5 ms), 2 inference workers x 1 torch thread.

LitServe's defaults otherwise (one uvicorn API server process per inference worker). The
multipart field ``file`` arrives in ``decode_request`` as an UploadFile.

    python litserve_app.py --model models/seednet/1/model.ts \
        --manifest models/seednet/1/manifest.json --port 8102
"""

from __future__ import annotations

import argparse

import litserve as ls
import numpy as np
import peer_common
import torch


class SeedNetAPI(ls.LitAPI):
    def __init__(self, model_path: str, manifest: str, **kwargs):
        super().__init__(**kwargs)
        self.model_path = model_path
        self.manifest = manifest

    def setup(self, device):
        torch.set_num_threads(1)
        self.model = peer_common.load_model(self.model_path)
        self.class_names = peer_common.load_class_names(self.manifest)

    def decode_request(self, request):
        upload = request["file"]
        data = upload.file.read() if hasattr(upload, "file") else upload
        return peer_common.decode(data)

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, x):
        return peer_common.run_model(self.model, x)

    def unbatch(self, output):
        probs, attention = output
        return [(probs[i], attention[i]) for i in range(len(probs))]

    def encode_response(self, output):
        probs, attention = output
        return peer_common.encode(probs, attention, self.class_names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batch-timeout-ms", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    api = SeedNetAPI(
        a.model, a.manifest, max_batch_size=a.batch, batch_timeout=a.batch_timeout_ms / 1000
    )
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=a.workers)
    server.run(host=a.host, port=a.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
