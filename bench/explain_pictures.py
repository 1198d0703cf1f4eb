"""Pictures of SeedNet's explanations: one CIFAR-10 test image per class.

    python bench/explain_pictures.py [--model seednet@1] [--out docs/explanations]

Writes three PNGs (palette-quantised to stay small):

- ``gradcam.png``: the image as uploaded (CIFAR-10 files are already 32x32, so it is
  also the model input), then the Grad-CAM of every block and macro block drawn over it;
- ``branches_gradcam.png`` / ``branches_strength.png``: each block's two branch maps
  (gradient-weighted / strength), scaled together per block, with each branch's share.

The overlay is what a page would draw: the map through the ``inferno`` colormap with an
alpha equal to the map's value (``seednet.heatmaps.to_png(..., overlay=True)``) over the
image. Every image is explained for the class the model predicts.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from registry import Registry
from seednet.constants import CIFAR10_CLASSES
from seednet.explain import Explainer
from seednet.heatmaps import colormap_lut

REPO = Path(__file__).resolve().parents[1]
CELL = 0.62  # inches per image


def first_test_images() -> np.ndarray:
    from training.data import default_source

    root = Path(default_source())
    root = root if root.is_absolute() else (REPO / root).resolve()
    files = [sorted((root / "test" / c).glob("*.jpg"))[0] for c in CIFAR10_CLASSES]
    return np.stack([np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1) for f in files])


def overlay(image: np.ndarray, saliency: np.ndarray, strength: float = 0.85) -> np.ndarray:
    """Image HWC uint8 with the colour-mapped map over it, alpha = value (as on a page)."""
    lut = colormap_lut("inferno").astype(np.float32)
    levels = np.round(np.clip(saliency, 0, 1) * 255).astype(np.uint8)
    alpha = strength * saliency[..., None]
    return (image * (1 - alpha) + lut[levels] * alpha).astype(np.uint8)


def grid(rows: list[list[np.ndarray]], col_titles, row_titles, cell_texts=None) -> Figure:
    n_rows, n_cols = len(rows), len(rows[0])
    fig = Figure(figsize=(n_cols * CELL + 1.2, n_rows * CELL + 0.5), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, gridspec_kw={"wspace": 0.04, "hspace": 0.18})
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.imshow(rows[r][c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_titles[c], fontsize=6.5)
            if c == 0:
                ax.set_ylabel(row_titles[r], fontsize=6.5, rotation=0, ha="right", va="center")
            if cell_texts and cell_texts[r][c]:
                ax.set_xlabel(cell_texts[r][c], fontsize=5.5, labelpad=1)
    fig.subplots_adjust(left=1.1 / (n_cols * CELL + 1.2), right=0.995, top=0.93, bottom=0.02)
    return fig


def save(fig: Figure, path: Path) -> int:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    image = Image.open(buffer).convert("RGB").quantize(colors=128, dither=Image.Dither.NONE)
    image.save(path, optimize=True)
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", type=Path, default=REPO / "models")
    parser.add_argument("--model", default="seednet@1")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "explanations")
    args = parser.parse_args()
    registry = Registry(args.registry)
    explainer = Explainer.from_registry(registry, registry.resolve(*args.model.split("@")))
    images = first_test_images()
    r = explainer.explain(images)
    args.out.mkdir(parents=True, exist_ok=True)
    hwc = images.transpose(0, 2, 3, 1)
    row_titles = [
        f"{CIFAR10_CLASSES[i]}\n→ {CIFAR10_CLASSES[t]} {100 * r['probabilities'][i, t]:.0f} %"
        for i, t in enumerate(r["target"].tolist())
    ]
    blocks = r["blocks"].tolist()
    macros = r["macro_blocks"].tolist()
    rows = [
        [hwc[i]]
        + [overlay(hwc[i], r["gradcam"][i, b]) for b in range(len(blocks))]
        + [overlay(hwc[i], r["macro_gradcam"][i, m]) for m in range(len(macros))]
        for i in range(len(images))
    ]
    titles = ["upload =\nmodel input"] + [f"block {b}" for b in blocks]
    titles += [f"macro {m + 1}\n(blocks {f}-{last})" for m, (f, last) in enumerate(macros)]
    sizes = {"gradcam.png": save(grid(rows, titles, row_titles), args.out / "gradcam.png")}
    for kind in ("gradcam", "strength"):
        maps, shares = r[f"branch_{kind}"], r[f"branch_{kind}_share"]
        rows, texts = [], []
        for i in range(len(images)):
            rows.append([hwc[i]])
            texts.append([""])
            for b in range(len(blocks)):
                for branch in range(maps.shape[2]):
                    rows[-1].append(overlay(hwc[i], maps[i, b, branch]))
                    texts[-1].append(f"{100 * shares[i, b, branch]:.0f} %")
        titles = ["upload"] + [
            f"b{b} br{br + 1}" for b in blocks for br in range(r[f"branch_{kind}"].shape[2])
        ]
        name = f"branches_{kind}.png"
        sizes[name] = save(grid(rows, titles, row_titles, texts), args.out / name)
    for name, size in sizes.items():
        print(f"{args.out / name}: {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
