"""Helpers for the protocol tests: requests built by the real tritonclient library."""

from __future__ import annotations

import numpy as np
import tritonclient.http as httpclient

MAX_BATCH = 8


def images(rng: np.random.Generator, n: int = 3) -> np.ndarray:
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def model_results(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """What the model would return for n images: softmax rows and attention."""
    logits = rng.normal(size=(n, 10)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    attention = rng.random((n, 7, 2)).astype(np.float32)
    return {"probabilities": probs.astype(np.float32), "attention": attention}


def http_body(inputs, outputs=None, request_id="", parameters=None):
    """(body, Inference-Header-Content-Length) exactly as tritonclient.http sends them."""
    return httpclient.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id=request_id, parameters=parameters
    )


def http_input(name: str, array: np.ndarray, datatype: str, binary: bool = True):
    i = httpclient.InferInput(name, list(array.shape), datatype)
    i.set_data_from_numpy(array, binary_data=binary)
    return i
