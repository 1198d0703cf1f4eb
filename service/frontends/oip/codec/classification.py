"""Triton's classification extension: top-K ``"score:index[:label]"`` strings.

A client that asks for ``"classification": K`` on an output gets, instead of the
tensor, a BYTES tensor ``[N, K]``: per batch item, the K highest values of that
item's (flattened) output in decreasing order, each as ``score:index:label``.
The score is printed the way Triton prints it (C++ ``std::to_string``, i.e.
``printf("%f")``: six decimals), so responses match a Triton server's byte for byte.
K larger than the number of classes returns all classes, as Triton does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def format_score(value: np.generic | float | int) -> str:
    """A score as Triton writes it: ``%f`` for floating point, decimal for integers."""
    if isinstance(value, np.integer | int):
        return str(int(value))
    return f"{float(value):f}"


def classify(scores: np.ndarray, k: int, labels: Sequence[str] = ()) -> np.ndarray:
    """Top-``k`` of each batch item of ``scores`` -> object array ``[N, min(k, C)]`` of bytes.

    Ties keep the lower index first. ``labels[i]`` is appended to index ``i`` when present.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    rows = np.asarray(scores).reshape(len(scores), -1)
    top = min(k, rows.shape[1])
    out = np.empty((rows.shape[0], top), dtype=object)
    for r, row in enumerate(rows):
        # descending by value, ties by lower index; via float64 because negating an
        # unsigned integer row would wrap around
        order = np.argsort(-row.astype(np.float64), kind="stable")[:top]
        for c, idx in enumerate(order):
            text = f"{format_score(row[idx])}:{idx}"
            if idx < len(labels):
                text += f":{labels[idx]}"
            out[r, c] = text.encode()
    return out
