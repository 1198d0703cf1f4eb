"""TorchServe custom handler for SeedNet's model.ts (batched by TorchServe's frontend).

Each request row carries the image in the multipart field ``file`` (or as the raw body).
``peer_common.py`` and ``manifest.json`` travel in the model archive as extra files.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler


class SeedNetHandler(BaseHandler):
    def initialize(self, context):
        torch.set_num_threads(1)  # 2 workers x 1 thread on a 2-core machine
        model_dir = context.system_properties["model_dir"]
        if model_dir not in sys.path:
            sys.path.insert(0, model_dir)
        import peer_common

        self.common = peer_common
        serialized = context.manifest["model"]["serializedFile"]
        self.model = peer_common.load_model(os.path.join(model_dir, serialized))
        self.class_names = peer_common.load_class_names(os.path.join(model_dir, "manifest.json"))
        self.initialized = True

    @staticmethod
    def _payload(row: dict) -> bytes:
        for key in ("file", "data", "body"):
            value = row.get(key)
            if value is not None:
                return bytes(value)
        raise ValueError(f"no image in the request (fields: {sorted(row)})")

    def preprocess(self, data):
        return np.stack([self.common.decode(self._payload(row)) for row in data])

    def inference(self, data, *args, **kwargs):
        return self.common.run_model(self.model, data)

    def postprocess(self, data):
        probs, attention = data
        return [
            self.common.encode(probs[i], attention[i], self.class_names) for i in range(len(probs))
        ]
