"""Calibration and the OOD flag as a user sees them: real JPEG files through POST /predict.

    python bench/calibration_http.py [--url http://127.0.0.1:8000] [--images ../shared/cifar10/test]
                                     [--half odd] [--per-class N] [--batch 32] [--label TEXT]
                                     [--version 3] [--corrupt blur|pixelate]

Sends the JPEG files of one half of the CIFAR-10 test set (within each class folder,
file names sorted: ``even`` or ``odd`` index, the split ``training calibrate`` fits on /
measures on; ``all`` for every file), ``--batch`` files per request in the repeated field
``files``, to a running service, and prints one row: the model that answered, images,
accuracy, mean confidence, ECE (15 equal-width bins), NLL, Brier and the share flagged
``out_of_distribution``, computed from the probabilities the service returned (JSON
floats), nothing else. ``--corrupt blur|pixelate`` sends corrupted copies instead
(the JPEG files of training.ood_sets.corrupt_jpegs, which `training calibrate` decodes).

The last column, ``ECE floor``, is what a perfectly calibrated model with the same
confidences would read on this many images (the median over 200 draws of labels from the
returned probabilities themselves): the ECE of a small set is mostly noise, and a
measured ECE near its floor says no more than "calibrated, as far as this set can tell".

Loopback targets only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.serve_bench import is_loopback_host  # noqa: E402
from training import calibration as cal  # noqa: E402


def half_files(folder: Path, half: str, per_class: int | None) -> list[tuple[str, Path]]:
    """(class folder name, file) of the chosen half, per class in sorted order."""
    out = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(class_dir.glob("*.jpg"))
        if half != "all":
            files = files[{"even": 0, "odd": 1}[half] :: 2]
        out += [(class_dir.name, f) for f in files[:per_class]]
    return out


def corrupted_jpeg(path: Path, kind: str) -> bytes:
    """The file's corrupted copy as ``training calibrate`` measures it (one JPEG)."""
    from PIL import Image

    from training.ood_sets import corrupt_jpegs

    with Image.open(path) as im:
        chw = np.asarray(im.convert("RGB")).transpose(2, 0, 1)[None]
    return corrupt_jpegs(chw, kind)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--images", type=Path, default=REPO_ROOT / "../shared/cifar10/test")
    p.add_argument("--half", choices=["even", "odd", "all"], default="odd")
    p.add_argument("--per-class", type=int, default=None)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--corrupt", choices=["blur", "pixelate"], default=None)
    p.add_argument("--label", default="")
    p.add_argument("--version", default=None, help="ask for this version (X-Model-Version)")
    args = p.parse_args(argv)
    if not is_loopback_host(httpx.URL(args.url).host):
        p.error("loopback targets only")
    files = half_files(args.images, args.half, args.per_class)
    probs, names, flagged, model = [], [], [], None
    headers = {"X-Model-Version": args.version} if args.version else {}
    with httpx.Client(base_url=args.url, timeout=120, headers=headers) as client:
        for i in range(0, len(files), args.batch):
            chunk = files[i : i + args.batch]
            upload = [
                (
                    "files",
                    (
                        f.name,
                        corrupted_jpeg(f, args.corrupt) if args.corrupt else f.read_bytes(),
                        "image/jpeg",
                    ),
                )
                for _, f in chunk
            ]
            r = client.post("/predict", files=upload)
            r.raise_for_status()
            body = r.json()
            model = body["model"]
            for pred in body["predictions"]:
                names = list(pred["probabilities"])
                probs.append([pred["probabilities"][c] for c in names])
                flagged.append(bool(pred.get("out_of_distribution")))
    index = {c: k for k, c in enumerate(names)}
    labels = np.array([index[c] for c, _ in files])
    q = np.asarray(probs, dtype=np.float64)
    s = cal.summary(q, labels)
    ref = f"{model['name']}@{model['version']}" if isinstance(model, dict) else str(model)
    print(
        f"{'label':<16}{'model':<22}{'images':>7}{'accuracy':>10}{'conf.':>8}{'ECE':>8}"
        f"{'NLL':>8}{'Brier':>8}{'flagged':>9}{'ECE floor':>11}"
    )
    print(
        f"{args.label:<16}{ref:<22}{len(labels):>7}{s['accuracy'] * 100:>9.2f}%"
        f"{s['mean_confidence'] * 100:>7.2f}%{s['ece'] * 100:>7.2f}%{s['nll']:>8.4f}"
        f"{s['brier']:>8.4f}{np.mean(flagged) * 100:>8.1f}%{ece_floor(q) * 100:>10.2f}%"
    )
    return 0


def ece_floor(probs: np.ndarray, draws: int = 200, seed: int = 0) -> float:
    """Median ECE of ``probs`` against labels drawn from ``probs`` (perfect calibration)."""
    rng = np.random.default_rng(seed)
    p = probs / probs.sum(axis=1, keepdims=True)
    cumulative = p.cumsum(axis=1)
    readings = []
    for _ in range(draws):
        u = rng.random((len(p), 1))
        drawn = np.minimum((u > cumulative).sum(axis=1), p.shape[1] - 1)
        readings.append(cal.ece(p, drawn))
    return float(np.median(readings))


if __name__ == "__main__":
    raise SystemExit(main())
