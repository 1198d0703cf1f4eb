"""An ablation and the chosen recipe's seeds, in one process and within a time budget.

    python -m training sweep --recipe v2 --ablation v2 --data data/cifar10.pack --out runs/v2

Phase 1 trains each variant of the ablation (``training.recipes.ABLATIONS``: overrides
of the base recipe) for a short schedule on a few seeds; phase 2 trains the chosen
recipe at its final length on more seeds; then one table: variant, epochs, training
seconds, test accuracy (mean +/- std over seeds), flip-TTA accuracy, final training
accuracy. The data is decoded once and the model object is shared (re-initialised in
place), so ``torch.compile`` compiles the training step once, not once per run.

The choice: every variant that only overrides fields of the base recipe and beats the
base's mean test accuracy by more than ``margin`` has its overrides adopted (in order of
gain, the largest last, so it wins a conflict). The final length is what fits
``run_budget`` seconds of training, compilation included, at the measured time per
epoch, unless given. Phase 1 stops early (the rest is reported as skipped) when what is
left of ``budget`` would not cover phase 2 as well.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from registry.files import write_json_atomic
from training.train import RunCache, TrainSettings, train


@dataclass(frozen=True)
class SweepPlan:
    variants: dict[str, dict]  # name -> overrides of the base recipe ("recipe" swaps it)
    ablation_epochs: int = 10
    ablation_seeds: int = 2
    final_seeds: int = 3
    final_epochs: int | None = None  # None: what fits run_budget
    run_budget: float = 110.0  # seconds of training per final run, compilation included
    budget: float | None = None  # wall seconds for the whole sweep (None: no limit)
    margin: float = 0.003  # accuracy a variant must gain over the base to be adopted
    choose: str = "auto"  # "auto" (the rule above) or "base"
    final_eval_every: int = 10


@dataclass
class SweepState:
    started: float = field(default_factory=time.perf_counter)
    runs: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    chosen: dict = field(default_factory=dict)
    final_epochs: int | None = None
    notes: list[str] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def _run_one(
    base: TrainSettings,
    cache: RunCache,
    phase: str,
    variant: str,
    overrides: dict,
    seed: int,
    epochs: int,
    out: Path,
    eval_every: int,
    reports: bool,
    measure_overhead: bool = False,
) -> dict:
    recipe = overrides.get("recipe", base.recipe)
    fields = {k: v for k, v in overrides.items() if k != "recipe"}
    settings = replace(
        base,
        recipe=recipe,
        overrides=fields,
        epochs=epochs,
        seed=seed,
        out=str(out / phase / f"{variant}-s{seed}"),
        eval_every=eval_every,
        checkpoint=False,
        reports=reports,
        resume=False,
        stop_after=None,
        measure_overhead=measure_overhead,
    )
    t0 = time.perf_counter()
    summary = train(settings, cache)
    wall = time.perf_counter() - t0
    history = [
        json.loads(x) for x in (Path(settings.out) / "metrics.jsonl").read_text().splitlines()
    ]
    epoch_seconds = [h["seconds"] for h in history]
    return {
        "phase": phase,
        "variant": variant,
        "overrides": overrides,
        "seed": seed,
        "epochs": len(history),
        "train_seconds": summary["train_seconds"],
        "init_seconds": summary["init_seconds"],
        "first_epoch_seconds": epoch_seconds[0],
        "median_epoch_seconds": statistics.median(epoch_seconds[1:] or epoch_seconds),
        "wall_seconds": wall,
        "test_accuracy": summary["test_accuracy"],
        "test_accuracy_flip_tta": summary["test_accuracy_flip_tta"],
        "final_train_accuracy": summary["final_train_accuracy"],
        "weights": summary["weights"],
        "device": summary["device"],
        "loop_overhead": summary.get("loop_overhead"),
        "out": settings.out,
    }


def _run_safely(state: SweepState, base: TrainSettings, *args, **kwargs) -> tuple:
    """One run; a run that fails under torch.compile is retried once without it (and the
    rest of the sweep runs without it), so one compiler problem costs one run's time,
    not the whole sweep. Returns (row or None, the settings to go on with)."""
    try:
        return _run_one(base, *args, **kwargs), base
    except Exception as exc:  # any failure: record it and keep the sweep going
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if not base.compile:
            state.notes.append(f"run {args[2]} seed {args[4]} failed: {message}")
            return None, base
        state.notes.append(f"torch.compile failed ({message}); the sweep goes on without it")
        base = replace(base, compile=False)
        try:
            return _run_one(base, *args, **kwargs), base
        except Exception as again:
            state.notes.append(f"run {args[2]} seed {args[4]} failed: {again}")
            return None, base


def _mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def choose(base_name: str, runs: list[dict], variants: dict[str, dict], margin: float) -> dict:
    """Overrides adopted from the ablation (see the module's docstring)."""
    by_variant: dict[str, list[dict]] = {}
    for r in runs:
        if r["phase"] == "ablation":
            by_variant.setdefault(r["variant"], []).append(r)
    base_rows = by_variant.get(base_name)
    if not base_rows:
        return {}
    base_acc = _mean(base_rows, "test_accuracy")
    gains = []
    for name, rows in by_variant.items():
        overrides = variants.get(name, {})
        if name == base_name or not overrides or "recipe" in overrides:
            continue
        gain = _mean(rows, "test_accuracy") - base_acc
        if gain > margin:
            gains.append((gain, name, overrides))
    chosen: dict = {}
    for _, _, overrides in sorted(gains, key=lambda g: g[0]):
        chosen |= overrides
    return chosen


def _final_epochs(plan: SweepPlan, state: SweepState, chosen_variants: list[str]) -> int | None:
    """Epochs that fit ``run_budget`` (with the first, cold run's compile overhead)."""
    ablation = [r for r in state.runs if r["phase"] == "ablation"]
    if not ablation:
        return None
    relevant = [r for r in ablation if r["variant"] in chosen_variants] or ablation
    per_epoch = max(statistics.median(r["median_epoch_seconds"] for r in relevant), 1e-6)
    cold = ablation[0]
    overhead = max(0.0, cold["first_epoch_seconds"] - cold["median_epoch_seconds"])
    init = max(r["init_seconds"] for r in relevant)
    epochs = math.floor((plan.run_budget - overhead - init) / per_epoch)
    state.notes.append(
        f"final length: {per_epoch:.2f} s per epoch, first-run overhead (compilation, warm-up) "
        f"{overhead:.1f} s, init {init:.1f} s -> {max(1, epochs)} epochs in "
        f"{plan.run_budget:.0f} s"
    )
    return max(1, epochs)


def run_sweep(
    plan: SweepPlan, base: TrainSettings, out: Path, order: list[str] | None = None
) -> SweepState:
    """Phase 1 (ablation) then phase 2 (the chosen recipe); writes ``out/sweep.json``."""
    out.mkdir(parents=True, exist_ok=True)
    cache = RunCache()
    state = SweepState()
    names = order or list(plan.variants)
    base_name = next((n for n in names if plan.variants[n] == {}), names[0])

    def save() -> None:
        write_json_atomic(
            out / "sweep.json",
            {
                "plan": asdict(plan),
                "base_recipe": base.recipe,
                "runs": state.runs,
                "skipped": state.skipped,
                "chosen_overrides": state.chosen,
                "final_epochs": state.final_epochs,
                "notes": state.notes,
                "elapsed_seconds": state.elapsed(),
            },
        )

    def final_wall() -> float:
        """A final run's wall time: its training budget plus what runs cost besides."""
        extra = [r["wall_seconds"] - r["train_seconds"] for r in state.runs] or [10.0]
        if plan.final_epochs is not None and state.runs:
            per_epoch = statistics.median(r["median_epoch_seconds"] for r in state.runs)
            return plan.final_epochs * per_epoch + max(extra)
        return plan.run_budget + max(extra)

    # ---- phase 1: the ablation
    for i, name in enumerate(names):
        for seed in range(plan.ablation_seeds):
            done = [r for r in state.runs if r["phase"] == "ablation"]
            estimate = statistics.fmean(r["wall_seconds"] for r in done) if done else 0.0
            reserve = plan.final_seeds * final_wall()
            if plan.budget is not None and state.elapsed() + estimate + reserve > plan.budget:
                state.skipped = [f"{n} (seeds {seed}+)" if n == name else n for n in names[i:]]
                state.notes.append(
                    f"ablation stopped at {state.elapsed():.0f} s: {estimate:.0f} s per run "
                    f"and {reserve:.0f} s for the final runs would pass the {plan.budget:.0f} s "
                    "budget"
                )
                break
            row, base = _run_safely(
                state,
                base,
                cache,
                "ablation",
                name,
                plan.variants[name],
                seed,
                plan.ablation_epochs,
                out,
                eval_every=plan.ablation_epochs,
                reports=False,
            )
            if row is not None:
                state.runs.append(row)
                print(_run_line(row), flush=True)
            save()
        if state.skipped:
            break

    # ---- phase 2: the chosen recipe at its final length
    if plan.choose == "auto":
        state.chosen = choose(base_name, state.runs, plan.variants, plan.margin)
    adopted = [
        n
        for n, o in plan.variants.items()
        if o and "recipe" not in o and all(state.chosen.get(k) == v for k, v in o.items())
    ]
    state.final_epochs = plan.final_epochs or _final_epochs(plan, state, [base_name, *adopted])
    if state.final_epochs is None:
        state.final_epochs = base.epochs  # None: the recipe's own length
    label = "chosen: " + (
        base.recipe + "".join(f" {k}={json.dumps(v)}" for k, v in state.chosen.items())
    )
    for seed in range(plan.final_seeds):
        if plan.budget is not None and state.elapsed() + final_wall() > plan.budget:
            state.skipped.append(f"final seed {seed}+")
            state.notes.append(f"final runs stopped at {state.elapsed():.0f} s (budget)")
            break
        row, base = _run_safely(
            state,
            base,
            cache,
            "final",
            "final",
            state.chosen,
            seed,
            state.final_epochs,
            out,
            eval_every=plan.final_eval_every,
            reports=True,
            measure_overhead=seed == 0,
        )
        if row is not None:
            row["label"] = label
            state.runs.append(row)
            print(_run_line(row), flush=True)
        save()
    save()
    (out / "table.txt").write_text(table(state) + "\n")
    return state


def _run_line(r: dict) -> str:
    return (
        f"[{r['phase']}] {r['variant']} seed {r['seed']}: {r['epochs']} epochs, "
        f"{r['train_seconds']:.1f} s training ({r['wall_seconds']:.1f} s wall), "
        f"test {100 * r['test_accuracy']:.2f}%, flip TTA {100 * r['test_accuracy_flip_tta']:.2f}%"
    )


def table(state: SweepState) -> str:
    """The sweep's table: one row per variant (mean +/- std over its seeds)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in state.runs:
        name = r.get("label", r["variant"]) if r["phase"] == "final" else r["variant"]
        groups.setdefault((r["phase"], name), []).append(r)
    header = (
        f"{'variant':<34} {'seeds':>5} {'epochs':>6} {'train s':>8} "
        f"{'test acc % (mean ± std)':>24} {'flip TTA %':>10} {'final train %':>13}"
    )
    lines = [header, "-" * len(header)]
    for (phase, name), rows in groups.items():
        accs = [100 * r["test_accuracy"] for r in rows]
        std = f"{statistics.stdev(accs):.2f}" if len(accs) > 1 else "-"
        lines.append(
            f"{name[:34]:<34} {len(rows):>5} {rows[0]['epochs']:>6} "
            f"{_mean(rows, 'train_seconds'):>8.1f} "
            f"{f'{statistics.fmean(accs):.2f} ± {std}':>24} "
            f"{100 * _mean(rows, 'test_accuracy_flip_tta'):>10.2f} "
            f"{100 * _mean(rows, 'final_train_accuracy'):>13.2f}"
        )
        if phase == "final" and name.startswith("chosen") and len(name) > 34:
            lines.append(f"  ({name})")
    for s in state.skipped:
        lines.append(f"{s[:34]:<34} skipped (time budget)")
    for r in state.runs:
        if r.get("loop_overhead") is not None:
            lines.append(
                f"note: loop overhead {100 * r['loop_overhead']:.1f} % of the step time "
                f"({r['phase']} {r['variant']} seed {r['seed']})"
            )
    lines += [f"note: {n}" for n in state.notes]
    if state.runs:
        lines.append(f"device: {state.runs[0]['device']}; wall {state.elapsed():.0f} s in all")
    return "\n".join(lines)
