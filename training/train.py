"""The training loop: recipes, checkpoints with exact resume, metrics and artefacts.

``train()`` runs the phases in order: setup (device, data, model, optimiser, schedule,
EMA), resume (exact state from checkpoint.pt), then per epoch: one pass over the data,
evaluation, save; finally the artefacts. A run directory holds, when training ends:

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

import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from registry.files import write_atomic, write_json_atomic
from seednet.constants import CIFAR10_MEAN, CIFAR10_STD, INPUT_SIZE
from seednet.device import resolve_device
from seednet.graph import Normalize, save_weights
from seednet.model import ARCHITECTURES, SeedNet, build_model
from training.data import (
    DEFAULT_DATA,
    Augmentation,
    ImageSet,
    alternating_flips,
    batches,
    flips_for_epoch,
    holdout_rule,
    load_split,
    split_calibration,
)
from training.ema import WeightEMA, ema_decay_at, ema_due
from training.evaluation import Evaluation, evaluate, format_table
from training.init import dirac_init_, whitening_init_, whitening_sample, zero_init_attention_
from training.recipes import RECIPES, Recipe
from training.reports import plot_confusion, plot_curves

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainSettings:
    """Everything a run depends on; written to config.json and checked on --resume."""

    recipe: str = "seed"
    data: str = DEFAULT_DATA
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
    # recipe fields to override (an ablation variant), e.g. {"whitening_init": False}
    overrides: dict = field(default_factory=dict)
    # torch.compile mode of the training step: "default", "reduce-overhead" (CUDA graphs)
    # or "max-autotune-no-cudagraphs"; only with compile=True
    compile_mode: str = "default"
    fused: bool | None = None  # fused optimiser step; None = on CUDA only
    checkpoint: bool = True  # write checkpoint.pt every epoch (what --resume needs)
    reports: bool = True  # plots, attention, predictions (off: summary and weights only)
    # after the run: time bare training steps on one fixed batch, and record how much of
    # the loop's step time is overhead (data, augmentation, schedule, EMA) in summary.json
    measure_overhead: bool = False
    # share of each class of the training split held out of training, to fit the
    # version's calibration on at publication (training.calibrate): 0.1 = 5,000 of the
    # 50,000 images (every tenth of each class folder); 0 trains on every image (what the
    # committed @1 versions did). Recorded in config.json and the manifest's dataset.
    calibration_fraction: float = 0.1

    def resolved_recipe(self) -> Recipe:
        base = RECIPES[self.recipe]
        return base.apply(self.overrides) if self.overrides else base


def onecycle(step: int, total: int, warmup_fraction: float) -> float:
    """Multiplier of the peak lr: linear rise from 1/25, then cosine down to ~0."""
    warm = max(1, int(total * warmup_fraction))
    if step < warm:
        return 0.04 + 0.96 * step / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) + 1e-4


def linear_warmup_decay(step: int, total: int, warmup_fraction: float, start: float, end: float):
    """Multiplier of the peak lr: linear from ``start`` to 1 over the first
    ``warmup_fraction`` of the steps, then linear to ``end`` at step ``total``."""
    warm = int(total * warmup_fraction) if warmup_fraction > 0 else 0
    if step < warm:
        return start + (1.0 - start) * step / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return 1.0 + (end - 1.0) * progress


def lr_factor(recipe: Recipe, total_steps: int):
    """The recipe's schedule as a function of the step (LambdaLR's argument)."""
    if recipe.schedule == "onecycle":
        return lambda s: onecycle(s, total_steps, recipe.warmup_fraction)
    if recipe.schedule == "linear":
        return lambda s: linear_warmup_decay(
            s, total_steps, recipe.warmup_fraction, recipe.warmup_start, recipe.final_lr
        )
    return lambda s: 1.0


def is_bn_or_bias(name: str, param: nn.Parameter) -> bool:
    """BatchNorm weights and biases and every bias: the 1-d parameters of a SeedNet."""
    return param.ndim <= 1


def parameter_groups(model: nn.Module, recipe: Recipe, lr: float) -> list[dict]:
    """The optimiser's parameter groups, and BN scales frozen when the recipe says so.

    One group (every trainable parameter at ``lr`` and the recipe's weight decay) unless
    the recipe gives BN and bias parameters their own lr multiplier or weight decay; then
    "weights" and "bn+bias" groups, named in the optimiser's param_groups.
    """
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.weight is not None:
            m.weight.requires_grad_(not recipe.freeze_bn_scale)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not recipe.grouped:
        return [{"params": [p for _, p in named], "lr": lr, "weight_decay": recipe.weight_decay}]
    return [
        {
            "name": "weights",
            "params": [p for n, p in named if not is_bn_or_bias(n, p)],
            "lr": lr,
            "weight_decay": recipe.weight_decay,
        },
        {
            "name": "bn+bias",
            "params": [p for n, p in named if is_bn_or_bias(n, p)],
            "lr": lr * recipe.bias_lr_scale,
            "weight_decay": recipe.bias_decay(),
        },
    ]


def make_optimizer(
    model: nn.Module, recipe: Recipe, lr: float, fused: bool = False
) -> torch.optim.Optimizer:
    groups = parameter_groups(model, recipe, lr)
    extra = {"fused": True} if fused else {}
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=recipe.weight_decay, **extra)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=lr,
            momentum=recipe.momentum,
            nesterov=recipe.nesterov,
            weight_decay=recipe.weight_decay,
            **extra,
        )
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}")


def apply_init(
    model: SeedNet, recipe: Recipe, train_set: ImageSet, normalize: Normalize, seed: int
) -> None:
    """The recipe's training-time init (training/init.py), after the Kaiming init.

    Uses no global RNG (whitening draws its rotations from its own generator), so turning
    one technique on or off leaves every other starting value as it was.
    """
    if recipe.dirac_init:
        dirac_init_(model, recipe.dirac_init)
    if recipe.zero_init_attention:
        zero_init_attention_(model)
    if recipe.whitening_init:
        sample = normalize(whitening_sample(train_set.images)).float()
        whitening_init_(model, sample, torch.Generator().manual_seed(seed + 3))
    momentum = 0.1 if recipe.bn_momentum is None else recipe.bn_momentum
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum


class TrainStep(nn.Module):
    """Normalise, forward, loss: what one training step computes before backward.

    One module so ``torch.compile`` sees the whole forward (input normalisation, bf16
    autocast, channels_last, the loss and the accuracy count) as one graph; returns
    (loss, number correct) as device tensors, never a Python number (no host sync).
    """

    def __init__(
        self,
        model: nn.Module,
        normalize: Normalize,
        label_smoothing: float,
        bf16: bool,
        channels_last: bool,
    ) -> None:
        super().__init__()
        self.model = model
        self.normalize = normalize
        self.label_smoothing = label_smoothing
        self.bf16 = bf16
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xf = self.normalize(x)
        if self.channels_last:
            xf = xf.contiguous(memory_format=torch.channels_last)
        with torch.autocast(xf.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits, _ = self.model(xf)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        return loss, (logits.argmax(1) == y).sum()


@dataclass
class RunCache:
    """What a sweep of runs in one process shares: decoded data, and one model object per
    architecture and device whose weights each run re-initialises in place, so the
    compiled training step (keyed by what its graph depends on) is compiled once."""

    data: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)
    steps: dict = field(default_factory=dict)


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


@dataclass
class Run:
    """The state of one training run, shared by its phases."""

    settings: TrainSettings
    recipe: Recipe
    epochs: int
    batch_size: int
    lr: float
    device: torch.device
    dist: _Dist
    out: Path
    train_set: ImageSet
    test_set: ImageSet
    data_seconds: float
    model: SeedNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: WeightEMA | None
    data_gen: torch.Generator
    run_config: dict
    per_rank_batch: int
    steps_per_epoch: int
    normalize: Normalize
    flip_base: torch.Tensor | None = None  # alternating flip: each image's odd-epoch flip
    init_seconds: float = 0.0  # data-dependent init (whitening), counted as training
    cache: RunCache | None = None
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0

    @property
    def use_bf16(self) -> bool:
        return self.device.type == "cuda"

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def final_model(self) -> SeedNet:
        """The EMA's weights once it has averaged anything, else the trained weights."""
        if self.ema is not None and self.ema.count > 0:
            return self.ema.module
        return self.model


def _log(msg: str) -> None:
    print(msg, flush=True)


def train(settings: TrainSettings, cache: RunCache | None = None) -> dict:
    """Train (or resume) a run; returns the summary written to summary.json.

    ``cache`` (sweeps in one process) shares decoded data and compiled code between runs.
    """
    run = setup(settings, cache)
    if settings.resume:
        resume(run)
    if run.dist.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run.out / "config.json", run.run_config)
    train_step = _wrap(run)
    last_epoch = min(run.epochs, settings.stop_after or run.epochs)
    for epoch in range(run.start_epoch + 1, last_epoch + 1):
        record = train_one_epoch(run, train_step, epoch)
        if run.dist.is_main:
            if epoch % settings.eval_every == 0 or epoch == run.epochs:
                record |= evaluate_epoch(run)
            run.history.append(record)
            _log(_epoch_line(record, run.epochs))
            save_checkpoint(run, epoch)
        run.dist.barrier()

    summary: dict = {}
    if run.dist.is_main and last_epoch == run.epochs:
        summary = finish_run(run, run.final_model())
        if settings.measure_overhead:
            summary |= loop_overhead(run, train_step)
            write_json_atomic(run.out / "summary.json", summary)
            _log(
                f"loop overhead: {100 * summary['loop_overhead']:.1f} % of the step time "
                f"({1e3 * summary['bare_step_seconds']:.2f} ms bare, "
                f"{1e3 * summary['loop_step_seconds']:.2f} ms in the loop)"
            )
    elif run.dist.is_main:
        _log(f"stopped after epoch {last_epoch} of {run.epochs}; continue with --resume")
    run.dist.barrier()
    run.dist.close()
    return summary


# ------------------------------------------------------------------ setup
def _setup_device(settings: TrainSettings) -> torch.device:
    device = resolve_device(settings.device)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        # cuDNN autotuning is fast but picks kernels by timing: bitwise reruns need it off
        torch.backends.cudnn.benchmark = not settings.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if settings.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device


def _load_data(
    settings: TrainSettings, device: torch.device, cache: RunCache | None
) -> tuple[ImageSet, ImageSet, float]:
    key = (settings.data, settings.limit_per_class, settings.calibration_fraction, str(device))
    if cache is not None and key in cache.data:
        return cache.data[key]
    t_data = time.perf_counter()
    train_set = load_split(settings.data, "train", settings.limit_per_class)
    train_set, _ = split_calibration(train_set, settings.calibration_fraction)  # fitted at publish
    train_set = train_set.to(device)
    test_set = load_split(settings.data, "test", settings.limit_per_class).to(device)
    loaded = (train_set, test_set, time.perf_counter() - t_data)
    if cache is not None:
        cache.data[key] = loaded
    return loaded


def _build_model(settings: TrainSettings, device: torch.device, cache: RunCache | None) -> SeedNet:
    """A freshly initialised model: a new one, or the cache's, re-initialised in place
    with exactly the values a new one would get."""
    model = build_model(ARCHITECTURES[settings.arch]).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if cache is None:
        return model
    key = (settings.arch, str(device))
    shared = cache.models.setdefault(key, model)
    if shared is not model:
        shared.load_state_dict(model.state_dict())
    return shared


def setup(settings: TrainSettings, cache: RunCache | None = None) -> Run:
    """Device, data, model (and its init), optimiser, schedule and EMA of a fresh run."""
    recipe = settings.resolved_recipe()
    epochs = settings.epochs if settings.epochs is not None else recipe.epochs
    batch_size = settings.batch_size or recipe.batch_size
    if epochs < 1:
        raise ValueError("--epochs must be at least 1")
    if batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    lr = settings.lr if settings.lr is not None else recipe.lr_for(batch_size)
    device = _setup_device(settings)
    dist = _Dist(device)
    if dist.enabled:
        cache = None  # one run per process under torchrun
    cfg = ARCHITECTURES[settings.arch]

    torch.manual_seed(settings.seed)
    train_set, test_set, data_seconds = _load_data(settings, device, cache)
    if dist.is_main:
        _log(
            f"data: {len(train_set)} train / {len(test_set)} test images decoded in "
            f"{data_seconds:.1f}s, on {device}"
        )

    model = _build_model(settings, device, cache)
    normalize = Normalize(CIFAR10_MEAN, CIFAR10_STD).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t_init = time.perf_counter()
    apply_init(model, recipe, train_set, normalize, settings.seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    init_seconds = time.perf_counter() - t_init if recipe.whitening_init else 0.0
    fused = settings.fused if settings.fused is not None else device.type == "cuda"
    optimizer = make_optimizer(model, recipe, lr, fused=fused)
    per_rank_batch = max(1, batch_size // dist.world_size)
    rank_images = len(range(dist.rank, len(train_set), dist.world_size))
    steps_per_epoch = max(1, rank_images // per_rank_batch)
    total_steps = steps_per_epoch * epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(recipe, total_steps))
    ema = WeightEMA(model) if recipe.ema_decay else None
    data_gen = torch.Generator(device=device)
    data_gen.manual_seed(settings.seed + 1)
    flip_base = None
    if recipe.flip and recipe.alternating_flip:
        flip_base = alternating_flips(len(train_set), settings.seed + 2).to(device)

    run_config = {
        "arch": settings.arch,
        "model_config": cfg.to_dict(),
        "recipe": recipe.to_dict() | {"lr": lr, "batch_size": batch_size, "epochs": epochs},
        "settings": asdict(settings),
        "dataset": {
            "train": train_set.description,
            "test": test_set.description,
            "name": "CIFAR-10",
            "calibration": {
                "split": "train",
                "fraction": settings.calibration_fraction,
                "rule": holdout_rule(settings.calibration_fraction),
                "images": train_set.description.get("calibration_held_out", 0),
            },
        },
        "class_names": list(train_set.classes),
        "normalization": {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)},
        "input_size": [INPUT_SIZE, INPUT_SIZE],
        "world_size": dist.world_size,
    }
    return Run(
        settings=settings,
        recipe=recipe,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        device=device,
        dist=dist,
        out=Path(settings.out),
        train_set=train_set,
        test_set=test_set,
        data_seconds=data_seconds,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        ema=ema,
        data_gen=data_gen,
        run_config=run_config,
        per_rank_batch=per_rank_batch,
        steps_per_epoch=steps_per_epoch,
        normalize=normalize,
        flip_base=flip_base,
        init_seconds=init_seconds,
        cache=cache,
    )


def _wrap(run: Run) -> nn.Module:
    """The training step the loop calls: DDP across processes and/or torch.compile."""
    module: nn.Module = run.model
    if run.dist.enabled:
        module = nn.parallel.DistributedDataParallel(
            module, device_ids=[run.device.index] if run.device.type == "cuda" else None
        )
    settings = run.settings
    key = (
        settings.arch,
        str(run.device),
        run.recipe.label_smoothing,
        settings.compile,
        settings.compile_mode,
    )
    if run.cache is not None and key in run.cache.steps:
        return run.cache.steps[key]
    step: nn.Module = TrainStep(
        module,
        run.normalize,
        run.recipe.label_smoothing,
        bf16=run.use_bf16,
        channels_last=run.device.type == "cuda",
    )
    if settings.compile:
        mode = None if settings.compile_mode == "default" else settings.compile_mode
        step = torch.compile(step, mode=mode)
    if run.cache is not None:
        run.cache.steps[key] = step
    return step


# ------------------------------------------------------------------ resume
def resume(run: Run) -> None:
    """Restore model, optimiser, schedule, EMA, RNGs and history from checkpoint.pt."""
    path = run.out / CHECKPOINT
    if not path.exists():
        if run.dist.is_main:
            _log(f"--resume: no checkpoint in {run.out}, starting from scratch")
        return
    ckpt = torch.load(path, map_location=run.device, weights_only=True)
    saved = json.loads(ckpt["run_config"])
    for key in ("arch", "model_config", "recipe"):
        if saved[key] != json.loads(json.dumps(run.run_config[key])):
            raise ValueError(f"--resume: the run in {run.out} used a different {key}")
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if run.ema is not None:
        run.ema.load_state_dict(ckpt["ema"])
    run.data_gen.set_state(ckpt["data_rng"].cpu())
    torch.set_rng_state(ckpt["cpu_rng"].cpu())
    if run.device.type == "cuda" and "cuda_rng" in ckpt:
        torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu(), run.device)
    run.history = json.loads(ckpt["history"])
    run.start_epoch = int(ckpt["epoch"])
    if run.dist.is_main:
        _log(f"resuming {run.out} after epoch {run.start_epoch}")


# ------------------------------------------------------------------ one epoch
def run_steps(
    run: Run, train_step: nn.Module, epoch: int, bar: tqdm | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The epoch's optimiser steps: (summed loss, number correct) on the device, images.

    Nothing here reads a device value (no host sync per step); on CUDA this runs under
    ``torch.cuda.set_sync_debug_mode("error")`` (tests/training/test_recipe_v2.py).
    """
    recipe, device, dist = run.recipe, run.device, run.dist
    augmentation = Augmentation(
        recipe.crop_padding,
        recipe.flip and run.flip_base is None,
        recipe.cutout,
        recipe.pad_mode,
    )
    flips = flips_for_epoch(run.flip_base, epoch) if run.flip_base is not None else None
    ema, total = run.ema, run.total_steps
    step = (epoch - 1) * run.steps_per_epoch  # global steps done before this epoch
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = 0
    for x, y in batches(
        run.train_set,
        run.per_rank_batch,
        run.data_gen,
        augmentation,
        drop_last=True,
        rank=dist.rank,
        world_size=dist.world_size,
        flips=flips,
    ):
        loss, hits = train_step(x, y)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.scheduler.step()
        step += 1
        if ema is not None and ema_due(step, total, recipe.ema_every, recipe.ema_start):
            decay = ema_decay_at(step, total, recipe.ema_decay, recipe.ema_every, recipe.ema_warmup)
            ema.update(run.model, decay, lookahead=recipe.ema_lookahead)
        loss_sum += loss.detach() * len(y)
        correct += hits
        seen += len(y)
        if bar is not None:  # host-side counts only: reading the loss would sync
            bar.update(1)
    if ema is not None and recipe.ema_lookahead and ema.count > 0:
        ema.copy_to(run.model)  # end the epoch on the average (airbench's lookahead)
    return loss_sum, correct, seen


def train_one_epoch(run: Run, train_step: nn.Module, epoch: int) -> dict:
    """One pass over the (augmented, shuffled) training data; returns the epoch's record.

    Loss and accuracy are summed on the device and read once, after the epoch.
    """
    device, dist = run.device, run.dist
    run.model.train()
    show_bar = dist.is_main and sys.stderr.isatty()
    t0 = time.perf_counter()
    bar = tqdm(
        total=run.steps_per_epoch,
        desc=f"epoch {epoch}/{run.epochs}",
        disable=not show_bar,
        leave=False,
        dynamic_ncols=True,
    )
    loss_sum, correct, seen = run_steps(run, train_step, epoch, bar if show_bar else None)
    bar.close()
    totals = dist.all_sum(
        torch.stack([loss_sum, correct, torch.tensor(float(seen), device=device)])
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return {
        "epoch": epoch,
        "train_loss": float(totals[0] / totals[2]),
        "train_accuracy": float(totals[1] / totals[2]),
        "lr": run.optimizer.param_groups[0]["lr"],
        "seconds": seconds,
        "images_per_second": float(totals[2]) / seconds,
    }


def loop_overhead(run: Run, train_step: nn.Module) -> dict:
    """The loop's median step time against bare steps (forward, backward, optimiser) on
    one fixed batch: the share of the step time spent on anything else. Changes the
    weights, so it runs after the artefacts are written. (A figure for the GPU: on a
    shared CPU it is noise, and it takes 3 steps there instead of 30.)"""
    steps, warmup = (30, 5) if run.device.type == "cuda" else (3, 1)
    images = run.train_set.images[: run.per_rank_batch]
    labels = run.train_set.labels[: run.per_rank_batch]
    run.model.train()

    def step() -> None:
        loss, _ = train_step(images, labels)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()

    for _ in range(warmup):
        step()
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    bare = (time.perf_counter() - t0) / steps
    epoch_seconds = sorted(h["seconds"] for h in run.history[1:] or run.history)
    in_loop = epoch_seconds[len(epoch_seconds) // 2] / run.steps_per_epoch
    return {
        "bare_step_seconds": bare,
        "loop_step_seconds": in_loop,
        "loop_overhead": max(0.0, 1.0 - bare / in_loop),
    }


# ------------------------------------------------------------------ evaluate
def evaluate_epoch(run: Run) -> dict:
    """Test loss and accuracy of the raw weights (and of the EMA once it has started)."""
    ev = evaluate(run.model, run.test_set, autocast=run.use_bf16, flip_tta=False)
    out = {"test_loss": ev.loss, "test_accuracy": ev.accuracy}
    if run.ema is not None:
        out |= {"ema_test_loss": None, "ema_test_accuracy": None}
        if run.ema.count > 0:
            ev_ema = evaluate(run.ema.module, run.test_set, autocast=run.use_bf16, flip_tta=False)
            out |= {"ema_test_loss": ev_ema.loss, "ema_test_accuracy": ev_ema.accuracy}
    return out


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


# ------------------------------------------------------------------ save
def save_checkpoint(run: Run, epoch: int) -> None:
    """checkpoint.pt (everything --resume needs, weights_only-loadable) and metrics.jsonl.

    The checkpoint is skipped when the run's settings say so (sweeps: no resume needed).
    """
    metrics = "".join(json.dumps(h) + "\n" for h in run.history)
    write_atomic(run.out / "metrics.jsonl", metrics, durable=False)
    if not run.settings.checkpoint:
        return
    ckpt = {
        "epoch": epoch,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "data_rng": run.data_gen.get_state(),
        "cpu_rng": torch.get_rng_state(),
        # JSON strings keep the checkpoint loadable with weights_only=True
        "history": json.dumps(run.history),
        "run_config": json.dumps(run.run_config),
    }
    if run.ema is not None:
        ckpt["ema"] = run.ema.state_dict()
    if run.device.type == "cuda":
        ckpt["cuda_rng"] = torch.cuda.get_rng_state(run.device)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    write_atomic(run.out / CHECKPOINT, buf.getvalue(), durable=False)


def finish_run(run: Run, model: SeedNet) -> dict:
    """Final fp32 evaluation and every artefact of the run."""
    out, test_set, run_config, history = run.out, run.test_set, run.run_config, run.history
    ev: Evaluation = evaluate(model, test_set, autocast=False, flip_tta=True)
    save_weights(model, out / "model.safetensors")
    classes = run_config["class_names"]
    write_json_atomic(
        out / "confusion_matrix.json",
        {"classes": classes, "rows": "true", "columns": "predicted", "matrix": ev.confusion},
    )
    if run.settings.reports:
        plot_confusion(ev.confusion, classes, out / "confusion_matrix.png")
        plot_curves(history, out / "curves.png")
        write_json_atomic(
            out / "attention_per_class.json",
            {
                "description": "mean softmax attention weights per intermediate block "
                "(network order) and branch, on the test set, grouped by class",
                "blocks": len(ev.attention_overall),
                "classes": classes,
                "by_true_class": ev.attention_by_true_class,
                "by_predicted_class": ev.attention_by_predicted_class,
                "overall": ev.attention_overall,
            },
        )
        write_json_atomic(
            out / "test_predictions.json",
            {
                "dataset": run_config["dataset"]["test"],
                "labels": test_set.labels.tolist(),
                "predictions": ev.predictions,
            },
        )
    # whitening's patch covariance is part of training; decoding the data is not
    train_seconds = sum(h["seconds"] for h in history) + run.init_seconds
    device = run.device
    summary = ev.summary() | {
        "epochs": len(history),
        "train_seconds": train_seconds,
        "init_seconds": run.init_seconds,
        "data_seconds": run.data_seconds,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "weights": "ema" if model is not run.model else "final",
        "final_train_accuracy": history[-1]["train_accuracy"] if history else None,
        # the JPEG folder and the packed file hold the q75 re-encoded copy
        "dataset": "CIFAR-10 (JPEG q75 copy)"
        if test_set.description.get("source") in ("jpeg-folder", "packed")
        else "CIFAR-10",
        "test_images": len(test_set),
    }
    write_json_atomic(out / "summary.json", summary)
    _log(
        format_table(
            ev, f"final model ({summary['weights']} weights), fp32, {len(test_set)} test images"
        )
    )
    _log(f"trained {len(history)} epochs in {train_seconds:.1f}s; artefacts in {out}")
    return summary
