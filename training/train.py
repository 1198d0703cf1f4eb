"""The training loop: recipes, checkpoints with exact resume, metrics and artefacts.

A run directory holds, when training ends:

    config.json                 model config, recipe, data, normalisation, classes
    metrics.jsonl               one line per epoch
    checkpoint.pt               the latest epoch (weights_only-loadable), for --resume
    model.safetensors           the final weights (the EMA when the recipe keeps one)
    summary.json                test accuracy, flip-TTA accuracy, per-class accuracy, timing
    confusion_matrix.json/.png  on the test set
    curves.png                  loss and accuracy per epoch
    attention_per_class.json    mean attention weights per block per class (test set)
    test_predictions.json       the final model's predicted label for every test image
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from training.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    Augmentation,
    ImageSet,
    batches,
    load_split,
    normalize,
)
from training.evaluation import Evaluation, evaluate, format_table
from training.model import ARCHITECTURES, SeedNet, build_model
from training.recipes import RECIPES, Recipe
from training.reports import plot_confusion, plot_curves

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainSettings:
    """Everything a run depends on; written to config.json and checked on --resume."""

    recipe: str = "seed"
    data: str = "../shared/cifar10"
    out: str = "runs/latest"
    arch: str = "seednet"
    epochs: int | None = None  # None: the recipe's
    batch_size: int | None = None  # None: the recipe's
    lr: float | None = None  # None: the recipe's (scaled to the batch size)
    device: str = "auto"
    limit_per_class: int | None = None
    seed: int = 0
    resume: bool = False
    compile: bool = False
    deterministic: bool = False  # CUDA: deterministic kernels, no cuDNN autotuning (slower)
    stop_after: int | None = None  # stop after this many epochs in total (time-sliced jobs)
    eval_every: int = 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; expected auto, cpu or cuda")
    return torch.device(name)


def onecycle(step: int, total: int, warmup_fraction: float) -> float:
    """Multiplier of the peak lr: linear rise from 1/25, then cosine down to ~0."""
    warm = max(1, int(total * warmup_fraction))
    if step < warm:
        return 0.04 + 0.96 * step / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) + 1e-4


def make_optimizer(model: nn.Module, recipe: Recipe, lr: float) -> torch.optim.Optimizer:
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=lr,
            momentum=recipe.momentum,
            nesterov=recipe.nesterov,
            weight_decay=recipe.weight_decay,
        )
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}")


class _Dist:
    """torchrun's environment, when there is one (DistributedDataParallel)."""

    def __init__(self, device: torch.device) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1
        if self.enabled:
            import torch.distributed as dist

            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()


def _atomic_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _log(msg: str) -> None:
    print(msg, flush=True)


def train(settings: TrainSettings) -> dict:
    """Train (or resume) a run; returns the summary written to summary.json."""
    recipe = RECIPES[settings.recipe]
    epochs = settings.epochs if settings.epochs is not None else recipe.epochs
    batch_size = settings.batch_size or recipe.batch_size
    if epochs < 1:
        raise ValueError("--epochs must be at least 1")
    if batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    lr = settings.lr if settings.lr is not None else recipe.lr_for(batch_size)
    device = resolve_device(settings.device)
    if device.type == "cuda":
        dist_local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(dist_local)
        device = torch.device("cuda", dist_local)
        # cuDNN autotuning is fast but picks kernels by timing: bitwise reruns need it off
        torch.backends.cudnn.benchmark = not settings.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if settings.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    dist = _Dist(device)
    out = Path(settings.out)
    cfg = ARCHITECTURES[settings.arch]

    torch.manual_seed(settings.seed)
    t_data = time.perf_counter()
    train_set = load_split(settings.data, "train", settings.limit_per_class).to(device)
    test_set = load_split(settings.data, "test", settings.limit_per_class).to(device)
    data_seconds = time.perf_counter() - t_data
    if dist.is_main:
        _log(
            f"data: {len(train_set)} train / {len(test_set)} test images decoded in "
            f"{data_seconds:.1f}s, on {device}"
        )

    model = build_model(cfg).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, recipe, lr)
    per_rank_batch = max(1, batch_size // dist.world_size)
    rank_images = len(range(dist.rank, len(train_set), dist.world_size))
    steps_per_epoch = max(1, rank_images // per_rank_batch)
    total_steps = steps_per_epoch * epochs
    if recipe.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: onecycle(s, total_steps, recipe.warmup_fraction)
        )
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ema = None
    if recipe.ema_decay:
        ema = torch.optim.swa_utils.AveragedModel(
            model,
            multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(recipe.ema_decay),
            use_buffers=True,
        )
    data_gen = torch.Generator(device=device)
    data_gen.manual_seed(settings.seed + 1)

    run_config = {
        "arch": settings.arch,
        "model_config": cfg.to_dict(),
        "recipe": recipe.to_dict() | {"lr": lr, "batch_size": batch_size, "epochs": epochs},
        "settings": asdict(settings),
        "dataset": {
            "train": train_set.description,
            "test": test_set.description,
            "name": "CIFAR-10",
        },
        "class_names": list(train_set.classes),
        "normalization": {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)},
        "input_size": [32, 32],
        "world_size": dist.world_size,
    }

    history: list[dict] = []
    start_epoch = 0
    if settings.resume and (out / CHECKPOINT).exists():
        ckpt = torch.load(out / CHECKPOINT, map_location=device, weights_only=True)
        saved = json.loads(ckpt["run_config"])
        for key in ("arch", "model_config", "recipe"):
            if saved[key] != json.loads(json.dumps(run_config[key])):
                raise ValueError(f"--resume: the run in {out} used a different {key}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        data_gen.set_state(ckpt["data_rng"].cpu())
        torch.set_rng_state(ckpt["cpu_rng"].cpu())
        if device.type == "cuda" and "cuda_rng" in ckpt:
            torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu(), device)
        history = json.loads(ckpt["history"])
        start_epoch = int(ckpt["epoch"])
        if dist.is_main:
            _log(f"resuming {out} after epoch {start_epoch}")
    elif settings.resume and dist.is_main:
        _log(f"--resume: no checkpoint in {out}, starting from scratch")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_json(out / "config.json", run_config)

    train_model: nn.Module = model
    if dist.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if settings.compile:
        train_model = torch.compile(train_model)
    augmentation = Augmentation(recipe.crop_padding, recipe.flip, recipe.cutout)
    use_bf16 = device.type == "cuda"
    show_bar = dist.is_main and sys.stderr.isatty()
    last_epoch = min(epochs, settings.stop_after or epochs)
    train_seconds = sum(h["seconds"] for h in history)

    for epoch in range(start_epoch + 1, last_epoch + 1):
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{epochs}",
            disable=not show_bar,
            leave=False,
            dynamic_ncols=True,
        )
        for step, (x, y) in enumerate(
            batches(
                train_set,
                per_rank_batch,
                data_gen,
                augmentation,
                drop_last=True,
                rank=dist.rank,
                world_size=dist.world_size,
            )
        ):
            xf = normalize(x)
            if device.type == "cuda":
                xf = xf.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits, _ = train_model(xf)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if show_bar:
                bar.update(1)
                if step % 20 == 0:
                    elapsed = time.perf_counter() - t0
                    bar.set_postfix(
                        loss=f"{float(loss_sum) / seen:.3f}",
                        acc=f"{100 * float(correct) / seen:.1f}%",
                        img_s=f"{seen * dist.world_size / elapsed:.0f}",
                    )
        bar.close()
        totals = dist.all_sum(
            torch.stack([loss_sum, correct, torch.tensor(float(seen), device=device)])
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        record = {
            "epoch": epoch,
            "train_loss": float(totals[0] / totals[2]),
            "train_accuracy": float(totals[1] / totals[2]),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": seconds,
            "images_per_second": float(totals[2]) / seconds,
        }
        if dist.is_main:
            evaluate_now = epoch % settings.eval_every == 0 or epoch == epochs
            if evaluate_now:
                ev = evaluate(model, test_set, autocast=use_bf16, flip_tta=False)
                record.update(test_loss=ev.loss, test_accuracy=ev.accuracy)
                if ema is not None:
                    ev_ema = evaluate(ema.module, test_set, autocast=use_bf16, flip_tta=False)
                    record.update(ema_test_loss=ev_ema.loss, ema_test_accuracy=ev_ema.accuracy)
            history.append(record)
            _log(_epoch_line(record, epochs))
            _save_checkpoint(
                out, epoch, model, optimizer, scheduler, ema, data_gen, device, history, run_config
            )
            _write_metrics(out, history)
        dist.barrier()

    summary: dict = {}
    if dist.is_main and last_epoch == epochs:
        final = ema.module if ema is not None else model
        summary = finish_run(
            out, final, test_set, run_config, history, train_seconds, data_seconds, device
        )
    elif dist.is_main:
        _log(f"stopped after epoch {last_epoch} of {epochs}; continue with --resume")
    dist.barrier()
    dist.close()
    return summary


def _epoch_line(r: dict, epochs: int) -> str:
    line = (
        f"epoch {r['epoch']:>3}/{epochs}  train loss {r['train_loss']:.4f} "
        f"acc {100 * r['train_accuracy']:.2f}%"
    )
    if "test_accuracy" in r:
        line += f"  test loss {r['test_loss']:.4f} acc {100 * r['test_accuracy']:.2f}%"
    if r.get("ema_test_accuracy") is not None:
        line += f"  ema acc {100 * r['ema_test_accuracy']:.2f}%"
    return line + (f"  lr {r['lr']:.2e}  {r['seconds']:.1f}s  {r['images_per_second']:.0f} img/s")


def _save_checkpoint(
    out, epoch, model, optimizer, scheduler, ema, data_gen, device, history, run_config
) -> None:
    ckpt = {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "data_rng": data_gen.get_state(),
        "cpu_rng": torch.get_rng_state(),
        # JSON strings keep the checkpoint loadable with weights_only=True
        "history": json.dumps(history),
        "run_config": json.dumps(run_config),
    }
    if ema is not None:
        ckpt["ema"] = ema.state_dict()
    if device.type == "cuda":
        ckpt["cuda_rng"] = torch.cuda.get_rng_state(device)
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, out / CHECKPOINT)


def _write_metrics(out: Path, history: list[dict]) -> None:
    tmp = out / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
    os.replace(tmp, out / "metrics.jsonl")


def save_weights(model: SeedNet, path: Path) -> None:
    state = {
        k: v.detach().float().contiguous().cpu()
        if v.is_floating_point()
        else v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(path), metadata={"format": "pt", "arch_config": model.config.to_json()})


def finish_run(
    out: Path,
    model: SeedNet,
    test_set: ImageSet,
    run_config: dict,
    history: list[dict],
    train_seconds: float,
    data_seconds: float,
    device: torch.device,
) -> dict:
    """Final fp32 evaluation and every artefact of the run."""
    ev: Evaluation = evaluate(model, test_set, autocast=False, flip_tta=True)
    save_weights(model, out / "model.safetensors")
    classes = run_config["class_names"]
    _atomic_json(
        out / "confusion_matrix.json",
        {"classes": classes, "rows": "true", "columns": "predicted", "matrix": ev.confusion},
    )
    plot_confusion(ev.confusion, classes, out / "confusion_matrix.png")
    plot_curves(history, out / "curves.png")
    _atomic_json(
        out / "attention_per_class.json",
        {
            "description": "mean softmax attention weights per intermediate block (network "
            "order) and branch, on the test set, grouped by class",
            "blocks": len(ev.attention_overall),
            "classes": classes,
            "by_true_class": ev.attention_by_true_class,
            "by_predicted_class": ev.attention_by_predicted_class,
            "overall": ev.attention_overall,
        },
    )
    _atomic_json(
        out / "test_predictions.json",
        {
            "dataset": run_config["dataset"]["test"],
            "labels": test_set.labels.tolist(),
            "predictions": ev.predictions,
        },
    )
    summary = ev.summary() | {
        "epochs": len(history),
        "train_seconds": train_seconds,
        "data_seconds": data_seconds,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "weights": "ema" if run_config["recipe"]["ema_decay"] else "final",
        # the JPEG folder and the packed file hold the q75 re-encoded copy
        "dataset": "CIFAR-10 (JPEG q75 copy)"
        if test_set.description.get("source") in ("jpeg-folder", "packed")
        else "CIFAR-10",
        "test_images": len(test_set),
    }
    _atomic_json(out / "summary.json", summary)
    _log(
        format_table(
            ev, f"final model ({summary['weights']} weights), fp32, {len(test_set)} test images"
        )
    )
    _log(f"trained {len(history)} epochs in {train_seconds:.1f}s; artefacts in {out}")
    return summary
