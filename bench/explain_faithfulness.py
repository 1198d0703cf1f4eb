"""How faithful are SeedNet's explanation maps? Deletion / insertion curves and the
model-parameter randomisation test, on real CIFAR-10 test images.

    python bench/explain_faithfulness.py curves  --per-class 50 --maps gradcam --out F.json
    python bench/explain_faithfulness.py curves  --per-class 10 --maps branches --out B.json
    python bench/explain_faithfulness.py randomisation --per-class 5 --out R.json
    python bench/explain_faithfulness.py table F.json B.json R.json     # markdown tables

The model is a registry version (default ``seednet@1`` in ``models/``), loaded from its
sha256-verified weights. The images are the first ``--per-class`` files of every class of
``$SEEDNET_CIFAR10/test`` (sorted names), explained for the class the model predicts.

Deletion (Petsiuk et al., RISE, 2018): replace the fraction f of pixels a map ranks
highest by the dataset's mean colour and record the model's probability for the
explained class; insertion: start from a blurred copy (Gaussian, sigma 5) and put back
the top fraction f of the original pixels. A faithful map makes the deletion curve fall
fast (small area) and the insertion curve rise fast (large area); the baseline is a
random order of the pixels. Pixels with equal scores (the zeros after Grad-CAM's ReLU)
come in random order. Curves are sampled at ``--fractions`` (0 and 1 added); area by the
trapezoid rule over f in [0, 1]. Every perturbed image goes through the served graph
(uint8 in, normalisation inside), as a client's image would: its ONNX export in ONNX
Runtime, checked against the eager model first.

Randomisation (Adebayo et al., Sanity checks for saliency maps, 2018): re-initialise the
weights from the top down (classifier, head, then stages 5 to 1, cumulatively; Kaiming
normal as in training, batch-norm running statistics kept) and compare each map with the
trained model's by Spearman rank correlation. A map that still looks the same once the
weights that computed it are random explains the image, not the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import gaussian_blur

from registry import Registry
from seednet.constants import CIFAR10_CLASSES, CIFAR10_MEAN
from seednet.explain import Explainer
from seednet.export import served_graph
from seednet.model import kaiming_init

REPO = Path(__file__).resolve().parents[1]
MEAN_COLOUR = torch.tensor([round(m * 255) for m in CIFAR10_MEAN], dtype=torch.uint8)
PIXELS = 32 * 32


def cifar_root() -> Path:
    from training.data import default_source

    path = Path(default_source())
    return path if path.is_absolute() else (REPO / path).resolve()


def load_images(per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` test files of every class: uint8 [N, 3, 32, 32], labels."""
    images, labels = [], []
    for label, name in enumerate(CIFAR10_CLASSES):
        files = sorted((cifar_root() / "test" / name).glob("*.jpg"))[:per_class]
        if len(files) < per_class:
            sys.exit(f"only {len(files)} test images of {name} under {cifar_root()}")
        for f in files:
            images.append(np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


def map_sets(result: dict[str, np.ndarray], which: str) -> dict[str, np.ndarray]:
    """Named saliency maps [N, 32, 32] from one explain() result."""
    maps: dict[str, np.ndarray] = {}
    if which == "gradcam":
        for i, b in enumerate(result["blocks"].tolist()):
            maps[f"Grad-CAM block {b}"] = result["gradcam"][:, i]
        for m, (first, last) in enumerate(result["macro_blocks"].tolist()):
            maps[f"Grad-CAM macro block {m + 1} (blocks {first}-{last})"] = result["macro_gradcam"][
                :, m
            ]
    else:
        for i, b in enumerate(result["blocks"].tolist()):
            maps[f"Grad-CAM block {b}"] = result["gradcam"][:, i]
            for kind in ("branch_gradcam", "branch_strength"):
                for branch in range(result[kind].shape[2]):
                    label = "gradient-weighted" if kind == "branch_gradcam" else "strength"
                    maps[f"block {b} branch {branch + 1}, {label}"] = result[kind][:, i, branch]
    return maps


class Scorer:
    """Probability of each image's class under the served graph, in batches.

    The perturbed images (most of this benchmark's time) run on the ONNX export in ONNX
    Runtime with the service's settings, about twice as fast as eager torch here; the
    export is checked against the eager model first, as the registry checks its exports.
    """

    def __init__(self, model, folder: Path, batch: int = 256) -> None:
        from seednet.export import save_onnx
        from seednet.runtimes import ort_run, ort_session

        path = folder / "model.onnx"
        save_onnx(model, path, torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
        self.session, self._run = ort_session(path), ort_run
        check = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
        with torch.no_grad():
            eager = model(check)[0].numpy()
        drift = float(np.abs(self._run(self.session, check.numpy())[0] - eager).max())
        if drift > 1e-4:
            raise RuntimeError(f"the ONNX export differs from eager by {drift}")
        self.batch = batch
        self.calls = 0

    def __call__(self, images: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch):
            probs = self._run(self.session, images[i : i + self.batch].numpy())[0]
            out.append(np.take_along_axis(probs, classes[i : i + self.batch, None].numpy(), 1))
        self.calls += len(images)
        return np.concatenate(out)[:, 0]


def rank_pixels(saliency: np.ndarray, patch: int, rng: np.random.Generator) -> np.ndarray:
    """Rank of every pixel (0 = removed first) per image, [N, 32, 32].

    Pixels go in square patches of ``patch`` x ``patch``, ranked by the map's mean over
    the patch; patches with equal scores come in random order.
    """
    n, side = saliency.shape[0], 32 // patch
    scores = saliency.reshape(n, side, patch, side, patch).mean(axis=(2, 4)).reshape(n, -1)
    order = np.lexsort((rng.random(scores.shape), -scores.astype(np.float64)), axis=1)
    patch_rank = np.empty_like(order)
    np.put_along_axis(patch_rank, order, np.arange(side * side)[None].repeat(n, 0), axis=1)
    grid = patch_rank.reshape(n, side, 1, side, 1)
    return np.array(np.broadcast_to(grid, (n, side, patch, side, patch))).reshape(n, 32, 32)


def curves(
    images: torch.Tensor,
    blurred: torch.Tensor,
    classes: torch.Tensor,
    ranks: np.ndarray,
    patch: int,
    fractions: list[float],
    scorer: Scorer,
    ends: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Deletion and insertion probabilities [N, len(grid)] for one ranking."""
    n = images.shape[0]
    inner = [f for f in fractions if 0 < f < 1]
    ranks_t = torch.from_numpy(ranks).view(n, 1, 32, 32)
    deleted, inserted = [], []
    for f in inner:
        top = ranks_t < round(f * PIXELS / patch**2)  # ranks count patches
        deleted.append(torch.where(top, MEAN_COLOUR.view(1, 3, 1, 1), images))
        inserted.append(torch.where(top, images, blurred))
    scores = scorer(torch.cat(deleted + inserted), classes.repeat(2 * len(inner)))
    scores = scores.reshape(2 * len(inner), n).T
    deletion = np.column_stack([ends["original"], scores[:, : len(inner)], ends["mean"]])
    insertion = np.column_stack([ends["blurred"], scores[:, len(inner) :], ends["original"]])
    return {"deletion": deletion, "insertion": insertion}


def auc(values: np.ndarray, grid: list[float]) -> np.ndarray:
    return np.trapezoid(values, np.asarray(grid), axis=1)


def run_curves(args) -> dict:
    registry = Registry(args.registry)
    mv = registry.resolve(*args.model.split("@"))
    served = served_graph(registry, mv)
    explainer = Explainer(served)
    scorer = Scorer(served, Path(tempfile.mkdtemp(prefix="explain-bench-")))
    images_np, labels = load_images(args.per_class)
    images = torch.from_numpy(images_np)
    t0 = time.perf_counter()
    results = [
        explainer.explain(images_np[i : i + 50], macro=args.maps == "gradcam")
        for i in range(0, len(images_np), 50)
    ]
    result = {k: np.concatenate([r[k] for r in results]) for k in results[0]}
    result["blocks"], result["macro_blocks"] = results[0]["blocks"], results[0]["macro_blocks"]
    explain_s = time.perf_counter() - t0
    classes = torch.from_numpy(result["target"])
    blurred = gaussian_blur(images, kernel_size=[31, 31], sigma=[5.0, 5.0])
    mean_image = MEAN_COLOUR.view(1, 3, 1, 1).expand(1, 3, 32, 32)
    ends = {
        "original": scorer(images, classes),
        "blurred": scorer(blurred, classes),
        # one mean-colour image, scored for every class
        "mean": scorer(mean_image.expand(10, 3, 32, 32).contiguous(), torch.arange(10))[
            classes.numpy()
        ],
    }
    grid = [0.0, *[f for f in args.fractions if 0 < f < 1], 1.0]
    rng = np.random.default_rng(args.seed)
    methods = {"random": rng.random((len(images_np), 32, 32))}
    methods.update(map_sets(result, args.maps))
    rows = {}
    t1 = time.perf_counter()
    for name, saliency in methods.items():
        c = curves(
            images,
            blurred,
            classes,
            rank_pixels(saliency, args.patch, rng),
            args.patch,
            grid,
            scorer,
            ends,
        )
        rows[name] = {
            "deletion_auc": auc(c["deletion"], grid).tolist(),
            "insertion_auc": auc(c["insertion"], grid).tolist(),
            "deletion_mean_curve": c["deletion"].mean(0).tolist(),
            "insertion_mean_curve": c["insertion"].mean(0).tolist(),
        }
        print(f"  {name}: {time.perf_counter() - t1:.0f} s", file=sys.stderr, flush=True)
    return {
        "kind": "curves",
        "model": mv.ref,
        "maps": args.maps,
        "patch": args.patch,
        "images": len(images_np),
        "per_class": args.per_class,
        "accuracy": float((result["target"] == labels).mean()),
        "grid": grid,
        "methods": rows,
        "explain_seconds": explain_s,
        "curve_seconds": time.perf_counter() - t1,
        "scored_images": scorer.calls,
        "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
    }


def average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (scipy.stats.rankdata's 'average')."""
    sorter = np.argsort(a, kind="mergesort")
    inverse = np.empty(sorter.size, dtype=np.intp)
    inverse[sorter] = np.arange(sorter.size)
    ordered = a[sorter]
    first = np.r_[True, ordered[1:] != ordered[:-1]]
    dense = first.cumsum()[inverse]
    count = np.r_[np.nonzero(first)[0], len(first)]
    return 0.5 * (count[dense] + count[dense - 1] + 1)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two maps; NaN when either is constant (e.g. all zeros)."""
    a, b = a.ravel(), b.ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(average_ranks(a), average_ranks(b))[0, 1])


CASCADE = ("classifier", "head", "stage 5", "stage 4", "stage 3", "stage 2", "stage 1")


def run_randomisation(args) -> dict:
    registry = Registry(args.registry)
    mv = registry.resolve(*args.model.split("@"))
    served = served_graph(registry, mv)
    images_np, _ = load_images(args.per_class)
    trained = Explainer(served).explain(images_np)
    target = trained["target"].tolist()
    explainer = Explainer(served)  # its own copy, randomised step by step below
    net = explainer.model.model
    modules = {
        "classifier": net.classifier,
        "head": net.head_conv,
        **{f"stage {i + 1}": stage for i, stage in enumerate(net.stages)},
    }
    kinds = {
        "gradcam": lambda r, i: r["gradcam"][:, i],
        "branch 1, gradient-weighted": lambda r, i: r["branch_gradcam"][:, i, 0],
        "branch 1, strength": lambda r, i: r["branch_strength"][:, i, 0],
    }
    torch.manual_seed(args.seed)
    steps = []
    for step in CASCADE:
        kaiming_init(modules[step])
        r = explainer.explain(images_np, target=target)
        entry: dict = {"randomised_down_to": step, "maps": {}}
        for kind, pick in kinds.items():
            for i, b in enumerate(trained["blocks"].tolist()):
                rho = np.array(
                    [spearman(pick(r, i)[n], pick(trained, i)[n]) for n in range(len(target))]
                )
                entry["maps"][f"{kind}, block {b}"] = {
                    "median_rho": float(np.nanmedian(rho)) if np.isfinite(rho).any() else None,
                    "constant": int(np.isnan(rho).sum()),
                }
        steps.append(entry)
        print(f"  randomised {step}", file=sys.stderr, flush=True)
    return {
        "kind": "randomisation",
        "model": mv.ref,
        "images": len(images_np),
        "steps": steps,
        "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
    }


def stats(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v)))


def print_tables(paths: list[Path]) -> None:
    for path in paths:
        data = json.loads(path.read_text())
        if data["kind"] == "curves":
            rows = data["methods"]
            rand_del = np.asarray(rows["random"]["deletion_auc"])
            rand_ins = np.asarray(rows["random"]["insertion_auc"])
            print(
                f"\n{data['model']}, {data['images']} images ({data['per_class']} per class), "
                f"accuracy on them {100 * data['accuracy']:.1f} %, grid {data['grid']}, "
                f"patches of {data['patch']}x{data['patch']} pixels, "
                f"{data['date']}\n"
            )
            print(
                "| map | deletion AUC (lower is better) | minus random's, same images "
                "| insertion AUC (higher is better) | minus random's, same images "
                "| images where deletion / insertion beats random |"
            )
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            for name, row in rows.items():
                d, i = np.asarray(row["deletion_auc"]), np.asarray(row["insertion_auc"])
                dm, ds = stats(d)
                im, is_ = stats(i)
                if name == "random":
                    print(f"| {name} | {dm:.3f} ± {ds:.3f} | | {im:.3f} ± {is_:.3f} | | |")
                    continue
                ddm, dds = stats(d - rand_del)
                idm, ids = stats(i - rand_ins)
                beats = f"{100 * (d < rand_del).mean():.0f} % / {100 * (i > rand_ins).mean():.0f} %"
                print(
                    f"| {name} | {dm:.3f} ± {ds:.3f} | {ddm:+.3f} ± {dds:.3f} "
                    f"| {im:.3f} ± {is_:.3f} | {idm:+.3f} ± {ids:.3f} | {beats} |"
                )
            print("\nMean curves (probability of the explained class at each fraction):\n")
            print("| map | deletion | insertion |")
            print("| --- | --- | --- |")
            for name, row in rows.items():
                dc = " ".join(f"{v:.2f}" for v in row["deletion_mean_curve"])
                ic = " ".join(f"{v:.2f}" for v in row["insertion_mean_curve"])
                print(f"| {name} | {dc} | {ic} |")
        else:
            steps = data["steps"]
            names = list(steps[0]["maps"])
            print(
                f"\n{data['model']}, {data['images']} images, median Spearman rho with the "
                f"trained model's map (constant maps, e.g. all zero, left out and counted), "
                f"{data['date']}\n"
            )
            print("| map | " + " | ".join(s["randomised_down_to"] for s in steps) + " |")
            print("| --- |" + " ---: |" * len(steps))
            for name in names:
                cells = []
                for s in steps:
                    m = s["maps"][name]
                    rho = "n/a" if m["median_rho"] is None else f"{m['median_rho']:.2f}"
                    cells.append(rho + (f" ({m['constant']} const.)" if m["constant"] else ""))
                print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("curves", "randomisation"):
        p = sub.add_parser(name)
        p.add_argument("--registry", type=Path, default=REPO / "models")
        p.add_argument("--model", default="seednet@1")
        p.add_argument("--per-class", type=int, default=50)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", type=Path, required=True)
        if name == "curves":
            p.add_argument("--maps", choices=("gradcam", "branches"), default="gradcam")
            p.add_argument("--patch", type=int, choices=(1, 2, 4, 8), default=4)
            p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    t = sub.add_parser("table")
    t.add_argument("results", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if args.command == "table":
        print_tables(args.results)
        return
    torch.set_grad_enabled(True)
    data = run_curves(args) if args.command == "curves" else run_randomisation(args)
    args.out.write_text(json.dumps(data))
    print_tables([args.out])


if __name__ == "__main__":
    main()
