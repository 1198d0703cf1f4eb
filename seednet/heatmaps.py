"""Explanation maps on the wire: float16 in base64, or PNG with a perceptual colormap.

A 32x32 map in ``[0, 1]`` is 2,048 bytes as float16 (2,732 characters of base64), for
clients that compute on it or draw it themselves; as a PNG data URL it is an image a
browser shows as it is, colour-mapped with matplotlib's perceptually uniform colormaps
(``inferno`` by default: dark = low, bright yellow = high; readable on light and dark
backgrounds). Only matplotlib's colormap tables are used (no pyplot, no figure), and
Pillow writes the PNG.

:func:`wire_explanation` turns one image's entry of :meth:`seednet.explain.Explainer.explain`
into plain JSON-ready data (documented there).
"""

from __future__ import annotations

import base64
import io
from functools import lru_cache

import numpy as np

from seednet.constants import CIFAR10_CLASSES

ENCODINGS = ("png", "f16")
BRANCH_MAPS = ("gradcam", "strength")


def to_float16_base64(values: np.ndarray) -> str:
    """Any array -> base64 of its values as little-endian float16, in C order."""
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f2").tobytes()).decode("ascii")


def from_float16_base64(text: str, shape: tuple[int, ...] = (32, 32)) -> np.ndarray:
    """The inverse of :func:`to_float16_base64` (float32 out); ValueError on a bad size."""
    raw = base64.b64decode(text, validate=True)
    count = int(np.prod(shape))
    if len(raw) != 2 * count:
        raise ValueError(f"{len(raw)} bytes do not hold {shape} float16 values")
    return np.frombuffer(raw, dtype="<f2").reshape(shape).astype(np.float32)


@lru_cache(maxsize=8)
def colormap_lut(name: str = "inferno") -> np.ndarray:
    """A matplotlib colormap as a ``[256, 3]`` uint8 table (ValueError if unknown)."""
    import matplotlib

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(f"unknown colormap {name!r}") from None
    table = cmap(np.linspace(0.0, 1.0, 256))[:, :3]
    lut = np.round(table * 255).astype(np.uint8)
    lut.flags.writeable = False
    return lut


def to_png(values: np.ndarray, cmap: str = "inferno", overlay: bool = False) -> bytes:
    """A 2-D map in ``[0, 1]`` -> PNG bytes, colour-mapped, same size as the map.

    ``overlay=True`` adds an alpha channel equal to the value, so where the map is low
    the picture underneath shows through (for drawing it over the image); otherwise the
    PNG is opaque RGB. Values outside ``[0, 1]`` and NaN are clipped to the ends.
    """
    from PIL import Image

    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"a map is 2-D, got shape {list(values.shape)}")
    levels = np.round(np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * 255).astype(np.uint8)
    rgb = colormap_lut(cmap)[levels]
    image = (
        Image.fromarray(np.dstack([rgb, levels]), "RGBA")
        if overlay
        else Image.fromarray(rgb, "RGB")
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def encode_map(
    values: np.ndarray,
    encodings: tuple[str, ...] = ENCODINGS,
    cmap: str = "inferno",
    overlay: bool = True,
) -> dict[str, str]:
    """One map -> ``{"png": data URL, "f16": base64}`` (the encodings asked for)."""
    unknown = set(encodings) - set(ENCODINGS)
    if unknown or not encodings:
        raise ValueError(f"encodings must be some of {ENCODINGS}, got {encodings}")
    out: dict[str, str] = {}
    if "png" in encodings:
        out["png"] = png_data_url(to_png(values, cmap, overlay))
    if "f16" in encodings:
        out["f16"] = to_float16_base64(values)
    return out


def wire_explanation(
    result: dict[str, np.ndarray],
    index: int,
    *,
    encodings: tuple[str, ...] = ENCODINGS,
    branch_maps: tuple[str, ...] = BRANCH_MAPS,
    cmap: str = "inferno",
    overlay: bool = True,
    labels: tuple[str, ...] = CIFAR10_CLASSES,
) -> dict:
    """Image ``index`` of an ``Explainer.explain`` result as JSON-ready data::

        {"target": 3, "label": "cat", "map_shape": [32, 32], "encodings": ["png", "f16"],
         "blocks": [{"block": 1, "attention": [0.47, 0.53],
                     "gradcam": {"png": "data:image/png;base64,...", "f16": "..."},
                     "branches": [{"branch": 1, "attention": 0.47,
                                   "gradcam_share": 0.61, "strength_share": 0.52,
                                   "gradcam": {...}, "strength": {...}}, ...]}, ...],
         "macro_blocks": [{"blocks": [3, 4], "gradcam": {...}}, ...]}

    Every map is 32x32 in ``[0, 1]``; ``f16`` is row-major float16, little-endian.
    ``branch_maps`` picks which branch maps are sent (the shares always are).
    """
    unknown = set(branch_maps) - set(BRANCH_MAPS)
    if unknown:
        raise ValueError(f"branch_maps must be some of {BRANCH_MAPS}, got {branch_maps}")

    def enc(values: np.ndarray) -> dict[str, str]:
        return encode_map(values, encodings, cmap, overlay)

    target = int(result["target"][index])
    attention = result["attention"][index]
    blocks = []
    for i, number in enumerate(result["blocks"].tolist()):
        weights = attention[number - 1]
        branches = []
        for branch in range(weights.shape[0]):
            entry: dict = {
                "branch": branch + 1,
                "attention": float(weights[branch]),
                "gradcam_share": float(result["branch_gradcam_share"][index, i, branch]),
                "strength_share": float(result["branch_strength_share"][index, i, branch]),
            }
            for kind in branch_maps:
                entry[kind] = enc(result[f"branch_{kind}"][index, i, branch])
            branches.append(entry)
        blocks.append(
            {
                "block": number,
                "attention": [float(w) for w in weights],
                "gradcam": enc(result["gradcam"][index, i]),
                "branches": branches,
            }
        )
    macro_blocks = [
        {"blocks": list(range(first, last + 1)), "gradcam": enc(result["macro_gradcam"][index, m])}
        for m, (first, last) in enumerate(result["macro_blocks"].tolist())
    ]
    return {
        "target": target,
        "label": labels[target],
        "map_shape": list(result["gradcam"].shape[-2:]),
        "encodings": list(encodings),
        "blocks": blocks,
        "macro_blocks": macro_blocks,
    }


__all__ = [
    "BRANCH_MAPS",
    "ENCODINGS",
    "colormap_lut",
    "encode_map",
    "from_float16_base64",
    "png_data_url",
    "to_float16_base64",
    "to_png",
    "wire_explanation",
]
