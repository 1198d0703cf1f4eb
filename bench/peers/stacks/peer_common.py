"""What the three peer stacks (TorchServe, LitServe, naive FastAPI) share.

Same input pipeline as the service, reduced to what CIFAR JPEGs need: decode with Pillow,
convert to RGB, resize the whole image to 32x32 with bicubic interpolation (no-op for a
32x32 file), uint8 ``[3, 32, 32]``. Normalisation is inside ``model.ts``. The response is
one JSON object per image: top label, confidence, the ten class probabilities by name and
the per-block attention weights -- the same content the service's ``/predict`` returns.

Kept free of anything but numpy, Pillow and torch, because TorchServe copies it into the
model archive and imports it from there.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZE = 32


def load_model(path: str | Path) -> torch.jit.ScriptModule:
    model = torch.jit.load(str(path), map_location="cpu")
    model.eval()
    return model


def load_class_names(manifest: str | Path) -> list[str]:
    return list(json.loads(Path(manifest).read_text())["class_names"])


def decode(data: bytes) -> np.ndarray:
    """Image bytes -> uint8 [3, 32, 32] (RGB, bicubic resize when not already 32x32)."""
    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
    if rgb.size != (SIZE, SIZE):
        rgb = rgb.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))


def run_model(model: torch.jit.ScriptModule, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, 3, 32, 32] -> (probabilities [N, 10], attention [N, blocks, L])."""
    with torch.inference_mode():
        # (calibrated versions add a third output, ood_score: the peers return the first two)
        probs, attention = model(torch.from_numpy(batch))[:2]
    return probs.numpy(), attention.numpy()


def encode(probs: np.ndarray, attention: np.ndarray, class_names: list[str]) -> dict:
    """One image's outputs -> JSON-ready dict."""
    top = int(np.argmax(probs))
    return {
        "label": class_names[top],
        "confidence": float(probs[top]),
        "probabilities": {c: float(p) for c, p in zip(class_names, probs, strict=True)},
        "attention": attention.tolist(),
    }
