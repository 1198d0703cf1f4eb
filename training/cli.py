"""`python -m training ...`: train, evaluate, pack-data, export, register, quantize,
calibrate, ood-sets."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from registry import ModelVersion, RegistryError
from seednet.model import ARCHITECTURES
from training.data import default_source
from training.recipes import ABLATIONS, RECIPES, parse_override


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line: 'error: <reason>' and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message}\n")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _override(text: str) -> tuple[str, object]:
    try:
        return parse_override(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


COMPILE_MODES = ["default", "reduce-overhead", "max-autotune-no-cudagraphs"]


def _add_run_options(t: argparse.ArgumentParser) -> None:
    """Options shared by train and sweep."""
    t.add_argument("--recipe", choices=sorted(RECIPES), default="seed")
    t.add_argument("--arch", choices=sorted(ARCHITECTURES), default="seednet")
    t.add_argument(
        "--data",
        default=default_source(),
        help="JPEG folder, packed file, or torchvision:ROOT (downloads); "
        "default: $SEEDNET_CIFAR10 or ../shared/cifar10",
    )
    t.add_argument("--batch-size", type=_positive, help="default: the recipe's")
    t.add_argument("--lr", type=float, help="peak lr (default: the recipe's, batch-scaled)")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--limit-per-class", type=_positive, help="first K images of each class")
    t.add_argument("--compile", action="store_true", help="torch.compile the training step")
    t.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default="default",
        help="torch.compile mode (reduce-overhead: CUDA graphs); implies --compile",
    )
    t.add_argument(
        "--fused",
        choices=["auto", "on", "off"],
        default="auto",
        help="fused optimiser step (auto: on CUDA)",
    )
    t.add_argument(
        "--deterministic",
        action="store_true",
        help="CUDA: bitwise-reproducible kernels (CPU runs always are); slower",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a SeedNet on CIFAR-10")
    _add_run_options(t)
    t.add_argument("--epochs", type=_positive, help="default: the recipe's")
    t.add_argument(
        "--set",
        dest="overrides",
        metavar="FIELD=VALUE",
        type=_override,
        action="append",
        default=[],
        help="override a recipe field (value as JSON), e.g. --set whitening_init=false",
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument(
        "--no-checkpoint",
        dest="checkpoint",
        action="store_false",
        help="do not write checkpoint.pt each epoch (no --resume possible)",
    )
    t.add_argument(
        "--stop-after", type=_positive, help="stop after this many epochs in total (resume later)"
    )
    t.add_argument(
        "--eval-every",
        type=_positive,
        default=1,
        help="evaluate on the test set every N epochs (and at the end)",
    )
    t.add_argument(
        "--calibration-fraction",
        type=float,
        default=0.1,
        help="share of each training class held out of training to fit the version's "
        "calibration on at --register (default 0.1: 5,000 of 50,000; 0: train on all)",
    )
    t.add_argument("--register", metavar="NAME", help="publish the run to the registry")
    t.add_argument(
        "--root", default="models", help="registry root for --register (folder or s3://...)"
    )

    w = sub.add_parser(
        "sweep", help="an ablation, then the chosen recipe on several seeds, in one process"
    )
    _add_run_options(w)
    w.add_argument("--ablation", choices=sorted(ABLATIONS), help="variants (default: none)")
    w.add_argument("--variants", help="comma-separated subset of the ablation, in this order")
    w.add_argument("--ablation-epochs", type=_positive, default=10)
    w.add_argument("--ablation-seeds", type=int, default=2)
    w.add_argument("--final-seeds", type=int, default=3)
    w.add_argument("--final-epochs", type=_positive, help="default: what fits --run-budget")
    w.add_argument("--final-eval-every", type=_positive, default=10)
    w.add_argument(
        "--run-budget",
        type=float,
        default=110.0,
        help="seconds of training per final run, compilation included",
    )
    w.add_argument("--budget", type=float, help="wall seconds for the whole sweep")
    w.add_argument("--margin", type=float, default=0.003, help="gain needed to adopt")
    w.add_argument("--choose", choices=["auto", "base"], default="auto")

    e = sub.add_parser("evaluate", help="print the accuracy table of a run or checkpoint")
    e.add_argument("source", help="run directory, registry version directory or checkpoint.pt")
    e.add_argument("--data", default=default_source())
    e.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    e.add_argument("--limit-per-class", type=_positive)
    e.add_argument("--batch-size", type=_positive, default=500)

    p = sub.add_parser("pack-data", help="pack a JPEG ImageFolder copy into one file")
    p.add_argument("src", type=Path)
    p.add_argument("dest", type=Path)

    x = sub.add_parser("export", help="export a run to TorchScript and ONNX, checked")
    x.add_argument("run_dir", type=Path)
    x.add_argument("--out", type=Path, required=True)

    r = sub.add_parser("register", help="publish an existing run to the registry")
    r.add_argument("run_dir", type=Path)
    r.add_argument("--name", required=True)
    r.add_argument("--root", default="models")
    r.add_argument("--alias", help="also point this alias (e.g. production) at it")
    r.add_argument(
        "--no-exports",
        action="store_true",
        help="do not build the derived TorchScript/ONNX exports now",
    )
    r.add_argument(
        "--force",
        action="store_true",
        help="publish a new version even if one already holds these weights",
    )

    q = sub.add_parser(
        "quantize",
        help="build a registry version's int8 export, gated on test accuracy",
        description="Static int8 quantisation of NAME@VERSION's ONNX export (QDQ, per-channel "
        "weights), calibrated on training images; fp32 and int8 accuracy on the test set are "
        "recorded in the version's exports.json, and an int8 export more than --max-drop "
        "points below fp32 is refused.",
    )
    q.add_argument("ref", metavar="NAME@VERSION")
    q.add_argument("--root", default="models", help="registry root (folder or s3://...)")
    q.add_argument("--data", default=default_source(), help="JPEG folder or packed file")
    q.add_argument(
        "--calibration-per-class",
        type=_positive,
        default=30,
        help="training images per class to calibrate on (default 30: 300 images)",
    )
    q.add_argument(
        "--test-limit-per-class",
        type=_positive,
        help="first K test images per class (default: the full test set)",
    )
    q.add_argument(
        "--max-drop",
        type=float,
        default=0.5,
        help="refuse the int8 export when it is more than this many points below fp32",
    )

    c = sub.add_parser(
        "calibrate",
        help="fit a version's temperature and OOD threshold, gate its int8 export, and "
        "publish the same weights calibrated as a new version (--register)",
        description="For NAME@VERSION's weights: fit the calibration (a temperature per "
        "image from its confidence, or one temperature) on images the "
        "network never trained on (the even half of the test set for versions trained on "
        "every training image, else the version's held-out calibration split), measure "
        "ECE/NLL/Brier before and after on other images (the odd half), the energy and "
        "max-softmax OOD scores on the sets under --ood-sets, calibration under blur and "
        "pixelation, and the int8 export against fp32 on the whole test set. Prints the "
        "tables; --register publishes NAME@<next> with parent NAME@VERSION.",
    )
    c.add_argument("ref", metavar="NAME@VERSION")
    c.add_argument("--root", default="models", help="registry root")
    c.add_argument("--data", default=default_source(), help="JPEG folder or packed file")
    c.add_argument(
        "--ood-sets",
        default="data/ood",
        help="folder built by `ood-sets` (default data/ood; skipped when missing)",
    )
    c.add_argument("--cache", default="data/calibration-cache", help="logits cache folder")
    c.add_argument(
        "--calibration",
        choices=["confidence-temperature", "temperature"],
        default="confidence-temperature",
        help="what the served probabilities use (both are measured): one temperature per "
        "image from its confidence (default), or one temperature for all",
    )
    c.add_argument(
        "--ood-score",
        choices=["density+energy", "energy", "max_softmax"],
        default="density+energy",
        help="the score put in the served graph (all are measured): density+energy adds "
        "the density of one stage's features to the energy of the logits",
    )
    c.add_argument(
        "--ood-stage",
        type=int,
        default=-2,
        help="density+energy: the stage whose channel means are the features (negative: "
        "from the end; default -2, the input of the last stage's attention)",
    )
    c.add_argument(
        "--density-per-class",
        type=_positive,
        default=500,
        help="density+energy: training images per class for the class Gaussians",
    )
    c.add_argument("--register", action="store_true", help="publish the calibrated version")
    c.add_argument(
        "--alias",
        help="with --register: point this alias (e.g. production) at the new version when "
        "no test image changes its top-1 class and the ECE went down",
    )
    c.add_argument("--no-int8", action="store_true", help="do not build the int8 export")
    c.add_argument("--max-drop", type=float, default=0.5, help="int8 gate, accuracy points")
    c.add_argument("--test-limit-per-class", type=_positive, help="first K test images per class")
    c.add_argument("--report-dir", type=Path, help="also copy the report and plot here")
    c.add_argument("--ood-per-set", type=_positive, help="the first K images of each OOD set")
    c.add_argument(
        "--shift-per-class",
        type=_positive,
        help="blur/pixelate only the first K evaluation images of each class",
    )

    o = sub.add_parser(
        "ood-sets",
        help="build the out-of-distribution image sets (offline, from packaged files)",
    )
    o.add_argument("--out", type=Path, default=Path("data/ood"))
    o.add_argument("--per-set", type=_positive, default=1000, help="images per set (at most)")
    o.add_argument("--seed", type=int, default=0)
    return parser


def _published(mv: ModelVersion, root: object) -> str:
    if mv.existing:
        return (
            f"already published as {mv.name}@{mv.version} in {root} (same weights sha256); "
            "nothing new was written (--force publishes it again)"
        )
    return f"published {mv.name}@{mv.version} to {root}"


def _train(args: argparse.Namespace) -> int:
    from training.data import check_source
    from training.train import TrainSettings, train

    check_source(args.data)  # fail fast, before importing data into memory
    if args.register:
        from registry import validate_name

        validate_name(args.register)
    settings = TrainSettings(
        recipe=args.recipe,
        data=args.data,
        out=args.out,
        arch=args.arch,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        limit_per_class=args.limit_per_class,
        seed=args.seed,
        resume=args.resume,
        deterministic=args.deterministic,
        stop_after=args.stop_after,
        eval_every=args.eval_every,
        overrides=dict(args.overrides),
        checkpoint=args.checkpoint,
        calibration_fraction=args.calibration_fraction,
        **_speed_options(args),
    )
    summary = train(settings)
    if args.register and summary:
        from training.publish import publish_run

        mv = publish_run(Path(args.out), args.register, args.root)
        print(_published(mv, args.root))
    return 0


def _speed_options(args: argparse.Namespace) -> dict:
    return {
        "compile": args.compile or args.compile_mode != "default",
        "compile_mode": args.compile_mode,
        "fused": {"auto": None, "on": True, "off": False}[args.fused],
    }


def _sweep(args: argparse.Namespace) -> int:
    from training.data import check_source
    from training.recipes import ABLATIONS
    from training.sweep import SweepPlan, run_sweep, table
    from training.train import TrainSettings

    check_source(args.data)
    variants = dict(ABLATIONS[args.ablation]) if args.ablation else {args.recipe: {}}
    order = list(variants)
    if args.variants:
        order = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in order if v not in variants]
        if unknown:
            raise ValueError(f"unknown variant(s) {', '.join(unknown)}; have {sorted(variants)}")
    plan = SweepPlan(
        variants={k: variants[k] for k in order},
        ablation_epochs=args.ablation_epochs,
        ablation_seeds=args.ablation_seeds,
        final_seeds=args.final_seeds,
        final_epochs=args.final_epochs,
        run_budget=args.run_budget,
        budget=args.budget,
        margin=args.margin,
        choose=args.choose,
        final_eval_every=args.final_eval_every,
    )
    base = TrainSettings(
        recipe=args.recipe,
        data=args.data,
        out=args.out,
        arch=args.arch,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        limit_per_class=args.limit_per_class,
        deterministic=args.deterministic,
        **_speed_options(args),
    )
    state = run_sweep(plan, base, Path(args.out), order)
    print(table(state))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from seednet.device import resolve_device
    from training.data import load_split
    from training.evaluation import evaluate, format_table
    from training.loading import load_model

    device = resolve_device(args.device)
    model, info = load_model(Path(args.source))
    model.to(device)
    data = load_split(args.data, "test", args.limit_per_class).to(device)
    ev = evaluate(model, data, batch_size=args.batch_size)
    print(format_table(ev, f"{args.source} ({info}), fp32, {len(data)} test images"))
    return 0


def _pack(args: argparse.Namespace) -> int:
    from training.data import pack_folder

    result = pack_folder(args.src, args.dest)
    print(
        f"packed {result['train']} train + {result['test']} test images into {args.dest} "
        f"({result['bytes'] / 1e6:.1f} MB)"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from training.export import export_run

    report = export_run(args.run_dir, args.out)
    print(report.table())
    return 0


def _register(args: argparse.Namespace) -> int:
    from training.publish import publish_run

    mv = publish_run(
        args.run_dir,
        args.name,
        args.root,
        alias=args.alias,
        exports=not args.no_exports,
        force=args.force,
    )
    print(_published(mv, args.root))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from registry import Registry
    from seednet.export import ExportError
    from seednet.quantize import quantize_version
    from training.data import load_split

    registry = Registry(args.root)
    mv = registry.get(args.ref)
    train = load_split(args.data, "train", args.calibration_per_class)
    test = load_split(args.data, "test", args.test_limit_per_class)
    print(
        f"{mv.ref}: calibrating on {len(train)} training images, evaluating on {len(test)} "
        f"test images ({test.description.get('source', args.data)})",
        flush=True,
    )
    data = {
        "calibration": {k: v for k, v in train.description.items() if k != "count"}
        | {"images": len(train)},
        "test": {k: v for k, v in test.description.items() if k != "count"} | {"images": len(test)},
    }
    try:
        report = quantize_version(
            registry,
            mv,
            train.images.numpy(),
            test.images.numpy(),
            test.labels.numpy(),
            max_drop_points=args.max_drop,
            data=_plain_json(data),
        )
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.table())
    print(f"recorded {mv.path / 'model.int8.onnx'} in exports.json ({report.seconds:.0f} s)")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from registry import Registry
    from training.calibrate import CalibrateSettings, calibrate_version

    registry = Registry(Path(args.root))
    parent = registry.get(args.ref)
    ood_dir = Path(args.ood_sets)
    if not ood_dir.is_dir():
        print(
            f"note: {ood_dir} not found, no OOD sets measured (build: python -m training "
            f"ood-sets --out {ood_dir})",
            file=sys.stderr,
        )
    settings = CalibrateSettings(
        calibration=args.calibration,
        ood_score=args.ood_score,
        ood_stage=args.ood_stage,
        density_per_class=args.density_per_class,
        ood_dir=ood_dir,
        cache_dir=Path(args.cache),
        int8=not args.no_int8,
        max_drop_points=args.max_drop,
        test_limit_per_class=args.test_limit_per_class,
        ood_per_set=args.ood_per_set,
        shift_per_class=args.shift_per_class,
    )
    result = calibrate_version(
        registry,
        parent,
        args.data,
        settings,
        register=args.register,
        alias=args.alias,
        report_dir=args.report_dir,
    )
    print(result.table())
    if "not_promoted" in result.report:
        print(f"not promoted: {result.report['not_promoted']}")
    elif "promoted" in result.report:
        print(f"{result.report['promoted']} -> {result.version.ref}")
    print(f"done in {result.seconds:.0f} s")
    return 0


def _ood_sets(args: argparse.Namespace) -> int:
    from training.ood_sets import build_ood_sets

    index = build_ood_sets(args.out, args.per_set, args.seed)
    for name, info in index["sets"].items():
        print(f"{name:<16}{info['images']:>6}  {info['description']}")
    for name, why in index["skipped"].items():
        print(f"{name:<16} skipped: {why}")
    return 0


def _plain_json(value):
    if isinstance(value, dict):
        return {str(k): _plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_json(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


COMMANDS = {
    "train": _train,
    "sweep": _sweep,
    "evaluate": _evaluate,
    "pack-data": _pack,
    "export": _export,
    "register": _register,
    "quantize": _quantize,
    "calibrate": _calibrate,
    "ood-sets": _ood_sets,
}


def main(argv: list[str] | None = None) -> int:
    # TorchScript is an export format chosen on purpose; torch marks all of it deprecated.
    warnings.filterwarnings("ignore", r"`torch\.jit\..*` is deprecated", FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError, RegistryError) as exc:
        # Input problems (missing data, bad settings) get one line, not a traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 1
