"""Recipe v2's pieces on the CPU: correctness, not accuracy.

Each technique of recipe v2 is a Recipe field; these tests check that each one does what
it says (the EMA averages the BN buffers too, the whitening init decorrelates the first
layer's outputs, the parameter groups carry their lr and weight decay, the schedule has
its values at chosen steps, a recipe survives JSON and the registry's manifest), that a
v2 run resumes bit for bit, and that a sweep's shared model leaks nothing between runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import MISSING, fields, replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from seednet.graph import Normalize
from seednet.model import ARCHITECTURES, build_model
from tests.conftest import REPO
from training.data import (
    ImageSet,
    alternating_flips,
    batches,
    flips_for_epoch,
    load_split,
    random_crop,
)
from training.ema import WeightEMA, ema_decay_at, ema_due
from training.init import (
    WHITENING_EPS,
    dirac_init_,
    patch_covariance,
    same_shape,
    whitening_init_,
    zero_init_attention_,
)
from training.recipes import ABLATIONS, RECIPES, Recipe, parse_override
from training.sweep import SweepPlan, SweepState, choose, run_sweep, table
from training.train import (
    RunCache,
    TrainSettings,
    linear_warmup_decay,
    lr_factor,
    make_optimizer,
    train,
)


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ARCHITECTURES["seednet-small"])


def corr(x: torch.Tensor) -> torch.Tensor:
    """Correlation matrix of the rows' variables (x: [samples, variables])."""
    x = x.double() - x.double().mean(0)
    c = x.T @ x / (len(x) - 1)
    d = torch.sqrt(torch.diagonal(c))
    return c / d[:, None] / d[None, :]


# ------------------------------------------------------------------ the recipe as data
def every_field_recipe() -> Recipe:
    """A recipe in which every field differs from Recipe's default."""
    return Recipe(
        name="every-field",
        optimizer="sgd",
        lr=0.05,
        weight_decay=1e-4,
        batch_size=20,
        epochs=1,
        reference_batch=64,
        momentum=0.8,
        nesterov=True,
        schedule="linear",
        warmup_fraction=0.5,
        label_smoothing=0.15,
        ema_decay=0.9,
        crop_padding=3,
        flip=False,
        cutout=4,
        warmup_start=0.3,
        final_lr=0.05,
        bias_lr_scale=4.0,
        bias_weight_decay=0.0,
        freeze_bn_scale=True,
        bn_momentum=0.3,
        ema_every=2,
        ema_start=0.1,
        ema_warmup=2.0,
        ema_lookahead=True,
        dirac_init=0.5,
        whitening_init=True,
        zero_init_attention=True,
        pad_mode="reflect",
        alternating_flip=True,
    )


def test_a_recipe_with_every_field_set_round_trips_through_json():
    recipe = every_field_recipe()
    for f in fields(Recipe):
        value = getattr(recipe, f.name)
        if f.default is not MISSING:  # a field with a default: must differ from it
            assert value != f.default, f"{f.name} is at its default: the test misses it"
    text = json.dumps(recipe.to_dict())
    assert Recipe.from_dict(json.loads(text)) == recipe
    # applying every field as overrides of another recipe gives the same recipe
    assert RECIPES["seed"].apply(json.loads(text)) == recipe


def test_seed_and_fast_have_every_v2_technique_off():
    v2_fields = [f for f in fields(Recipe) if f.name not in ("name",)]
    defaults = {f.name: f.default for f in v2_fields}
    new = [
        "warmup_start",
        "final_lr",
        "bias_lr_scale",
        "bias_weight_decay",
        "freeze_bn_scale",
        "bn_momentum",
        "ema_every",
        "ema_start",
        "ema_warmup",
        "ema_lookahead",
        "dirac_init",
        "whitening_init",
        "zero_init_attention",
        "pad_mode",
        "alternating_flip",
    ]
    for name in ("seed", "fast"):
        for field_name in new:
            assert getattr(RECIPES[name], field_name) == defaults[field_name], (name, field_name)
    v2 = RECIPES["v2"]
    assert [f for f in new if getattr(v2, f) == defaults[f]] == ["final_lr", "bias_weight_decay"]


def test_overrides_are_checked_and_the_ablation_only_names_real_fields():
    v2 = RECIPES["v2"]
    assert v2.apply({"whitening_init": False}).whitening_init is False
    assert v2.apply({"bn_momentum": None}).bn_momentum is None
    assert v2.apply({"lr": 1}).lr == 1.0 and isinstance(v2.apply({"lr": 1}).lr, float)
    with pytest.raises(ValueError, match="unknown recipe field"):
        v2.apply({"whitening": True})
    with pytest.raises(ValueError, match="must be bool"):
        v2.apply({"whitening_init": "yes"})
    with pytest.raises(ValueError, match="pad_mode"):
        v2.apply({"pad_mode": "wrap"})
    assert parse_override("label_smoothing=0.1") == ("label_smoothing", 0.1)
    assert parse_override("pad_mode=zeros") == ("pad_mode", "zeros")
    assert parse_override("bn_momentum=null") == ("bn_momentum", None)
    for variants in ABLATIONS.values():
        for overrides in variants.values():
            base = RECIPES[overrides.get("recipe", "v2")]
            base.apply({k: v for k, v in overrides.items() if k != "recipe"})


# ------------------------------------------------------------------ parameter groups
def test_parameter_groups_carry_their_lr_and_weight_decay_and_bn_scales_freeze():
    model = small_model()
    recipe = RECIPES["v2"]  # bias_lr_scale 16, BN scales frozen, wd 5e-4
    opt = make_optimizer(model, recipe, lr=0.4)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"weights", "bn+bias"}
    names = {id(p): n for n, p in model.named_parameters()}
    weights = {names[id(p)] for p in groups["weights"]["params"]}
    biases = {names[id(p)] for p in groups["bn+bias"]["params"]}
    bn_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    # every BN scale is frozen at 1 and in no group; every other parameter in exactly one
    assert all(not model.get_parameter(n).requires_grad for n in bn_weights)
    assert all(bool((model.get_parameter(n) == 1).all()) for n in bn_weights)
    assert weights.isdisjoint(biases) and not (weights | biases) & bn_weights
    assert weights | biases | bn_weights == set(names.values())
    assert all(n.endswith(".bias") for n in biases)
    assert "classifier.2.bias" in biases and "stages.0.block.attention.bias" in biases
    assert all(model.get_parameter(n).ndim > 1 for n in weights)
    # each group's lr (before the schedule's factor) and weight decay
    assert groups["weights"]["lr"] == 0.4 and groups["bn+bias"]["lr"] == 0.4 * 16
    assert groups["weights"]["weight_decay"] == 5e-4
    # None: weight_decay / bias_lr_scale, so lr x wd (the decay per step) is the same
    assert groups["bn+bias"]["weight_decay"] == pytest.approx(5e-4 / 16)
    assert groups["bn+bias"]["lr"] * groups["bn+bias"]["weight_decay"] == pytest.approx(0.4 * 5e-4)
    explicit = make_optimizer(model, recipe.apply({"bias_weight_decay": 0.0}), lr=0.4)
    assert {g["name"]: g["weight_decay"] for g in explicit.param_groups}["bn+bias"] == 0.0
    # the schedule scales both groups by the same factor
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(recipe, 100))
    assert groups["weights"]["lr"] == pytest.approx(0.4 * 0.1)
    assert groups["bn+bias"]["lr"] == pytest.approx(0.4 * 16 * 0.1)
    for _ in range(20):
        opt.step()
        sched.step()
    assert groups["weights"]["lr"] == pytest.approx(0.4)
    assert groups["bn+bias"]["lr"] == pytest.approx(0.4 * 16)


def test_without_groups_every_parameter_is_one_group_as_before():
    model = small_model()
    for name in ("seed", "fast"):
        opt = make_optimizer(model, RECIPES[name], lr=0.1)
        assert len(opt.param_groups) == 1
        assert len(opt.param_groups[0]["params"]) == len(list(model.parameters()))
        assert opt.param_groups[0]["weight_decay"] == RECIPES[name].weight_decay
    assert all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------ schedule
def test_linear_schedule_values_at_chosen_steps():
    f = lambda s: linear_warmup_decay(s, 100, 0.2, 0.1, 0.0)  # noqa: E731
    assert f(0) == pytest.approx(0.1)
    assert f(10) == pytest.approx(0.55)
    assert f(20) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)
    assert f(99) == pytest.approx(0.0125)
    assert f(100) == 0.0 and f(130) == 0.0
    # to a floor instead of zero, and without warm-up
    assert linear_warmup_decay(50, 100, 0.0, 0.0, 0.2) == pytest.approx(0.6)
    assert linear_warmup_decay(0, 100, 0.0, 0.0, 0.0) == 1.0
    v2 = RECIPES["v2"]
    g = lr_factor(v2, 1000)
    assert [round(g(s), 6) for s in (0, 100, 200, 600, 1000)] == [0.1, 0.55, 1.0, 0.5, 0.0]


def test_ema_schedule_values_at_chosen_steps():
    # airbench's: decay**every scaled by (step / total)**warmup
    assert ema_decay_at(500, 1000, 0.95, every=5, warmup=3.0) == pytest.approx(0.95**5 * 0.125)
    assert ema_decay_at(1000, 1000, 0.95, every=5, warmup=3.0) == pytest.approx(0.95**5)
    assert ema_decay_at(7, 1000, 0.999) == 0.999  # fast's: constant
    # updates every 5 steps once 30 % of the 1000 steps are done
    due = [s for s in range(1, 1001) if ema_due(s, 1000, every=5, start=0.3)]
    assert due[0] == 305 and due[-1] == 1000 and len(due) == 140
    assert all(ema_due(s, 10) for s in range(1, 11))


# ------------------------------------------------------------------ EMA
def _train_mode_forward(model: nn.Module, seed: int) -> None:
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))


def test_ema_averages_the_bn_buffers_with_the_weights():
    model = small_model()
    ema = WeightEMA(model)
    _train_mode_forward(model, 1)  # moves every BN's running statistics
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    ema.update(model, decay=0.9)  # the first update copies
    theirs, mine = model.state_dict(), ema.module.state_dict()
    assert theirs.keys() == mine.keys()
    assert all(torch.equal(theirs[k], mine[k]) for k in theirs)
    bn = "stages.0.block.branches.0.1"
    before = {k: v.clone() for k, v in mine.items()}
    _train_mode_forward(model, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    ema.update(model, decay=0.9)
    theirs, mine = model.state_dict(), ema.module.state_dict()
    for key in (f"{bn}.running_mean", f"{bn}.running_var", f"{bn}.weight", "classifier.5.bias"):
        assert not torch.equal(before[key], theirs[key])
        assert torch.equal(mine[key], torch.lerp(before[key], theirs[key], 0.1)), key
    assert int(mine[f"{bn}.num_batches_tracked"]) == 2  # integers are copied
    assert not torch.equal(mine[f"{bn}.running_mean"], theirs[f"{bn}.running_mean"])
    assert ema.count == 2 and int(ema.n_averaged) == 2
    # lookahead: the average is copied back into the trained model
    _train_mode_forward(model, 3)
    ema.update(model, decay=0.5, lookahead=True)
    theirs, mine = model.state_dict(), ema.module.state_dict()
    assert all(torch.equal(theirs[k], mine[k]) for k in theirs)
    # the state dict keeps AveragedModel's keys, and the host-side count comes back
    again = WeightEMA(small_model(5))
    again.load_state_dict(ema.state_dict())
    assert again.count == 3 and "n_averaged" in ema.state_dict()
    assert all(torch.equal(again.module.state_dict()[k], mine[k]) for k in mine)


# ------------------------------------------------------------------ init
@pytest.fixture(scope="module")
def normalized_train(cifar_dir) -> torch.Tensor:
    images = load_split(cifar_dir, "train", limit_per_class=20).images
    return Normalize()(images)


def _first_branch_outputs(model: nn.Module, x: torch.Tensor, branch: int, n: int):
    conv = model.stages[0].block.branches[branch][0]
    out = F.conv2d(x, conv.weight[:n])  # no padding: the interior patches
    return out.permute(0, 2, 3, 1).reshape(-1, n)


def test_whitening_init_decorrelates_the_first_layers_patch_outputs(normalized_train, cifar_dir):
    torch.manual_seed(0)
    model = build_model(ARCHITECTURES["seednet"])  # 3 -> 64, 3x3: d = 27, 54 filters
    kaiming = [b[0].weight.detach().clone() for b in model.stages[0].block.branches]
    before = corr(_first_branch_outputs(model, normalized_train, 0, 27))
    off = ~torch.eye(27, dtype=torch.bool)
    assert before[off].abs().max() > 0.5  # Kaiming filters on natural images: correlated
    set_per_branch = whitening_init_(model, normalized_train, torch.Generator().manual_seed(1))
    assert set_per_branch == 54
    # branch 0: outputs uncorrelated, variances l / (l + eps) (l: the patch covariance's
    # eigenvalues, largest first; ~1 where l >> eps, attenuated where l ~ eps)
    eig = torch.linalg.eigvalsh(patch_covariance(normalized_train, (3, 3))).flip(0)
    expected = eig / (eig + WHITENING_EPS)
    out = _first_branch_outputs(model, normalized_train, 0, 27).double()
    assert corr(out)[off].abs().max() < 1e-3
    assert torch.allclose(out.var(0), expected, rtol=2e-3, atol=1e-5)
    # branch 1: the same whitening turned by a random rotation: the same spectrum
    out1 = _first_branch_outputs(model, normalized_train, 1, 27).double()
    spectrum = torch.linalg.eigvalsh(torch.cov(out1.T)).flip(0)
    assert torch.allclose(spectrum, expected, rtol=2e-3, atol=1e-5)
    w0 = model.stages[0].block.branches[0][0].weight.detach()
    w1 = model.stages[0].block.branches[1][0].weight.detach()
    assert torch.equal(w0[27:54], -w0[:27])  # +/- pairs
    assert not torch.allclose(w0[:54], w1[:54])  # the branches differ (a rotation)
    assert torch.equal(w0[54:], kaiming[0][54:]) and torch.equal(w1[54:], kaiming[1][54:])
    # held-out images (the test split): still far less correlated than before
    held_out = Normalize()(load_split(cifar_dir, "test", limit_per_class=20).images)
    c = corr(_first_branch_outputs(model, held_out, 0, 27))
    assert c[off].abs().max() < 0.5 * before[off].abs().max()


def test_patch_covariance_matches_a_direct_computation():
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cov = patch_covariance(x, (3, 3), chunk=4)
    patches = x.unfold(2, 3, 1).unfold(3, 3, 1)  # [n, c, 6, 6, 3, 3]
    flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 27).double()
    assert torch.allclose(cov, torch.cov(flat.T), atol=1e-10)


def test_zero_init_attention_mixes_every_block_evenly():
    model = small_model()
    assert zero_init_attention_(model) == 7
    model.eval()
    with torch.no_grad():
        _, attentions = model(torch.randn(4, 3, 32, 32))
    for a in attentions:
        assert torch.equal(a, torch.full_like(a, 0.5))


def test_dirac_init_adds_an_identity_to_same_shape_convs_only():
    model = small_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert dirac_init_(model, 1.0) == 6  # 3 same-shape blocks (256->256, 384->384 x2) x 2
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    convs = {
        f"{n}.weight"
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and same_shape(m)
    }
    assert changed == convs and len(convs) == 6
    name = sorted(convs)[0]
    conv = model.get_submodule(name.removesuffix(".weight"))
    identity = model.get_parameter(name).detach() - before[name]
    x = torch.randn(2, conv.in_channels, 8, 8)
    assert torch.allclose(F.conv2d(x, identity, padding=conv.padding), x, atol=1e-6)


# ------------------------------------------------------------------ augmentation
def test_alternating_flip_mirrors_each_image_in_every_other_epoch():
    base = alternating_flips(40, seed=3)
    assert torch.equal(base, alternating_flips(40, seed=3)) and 5 < int(base.sum()) < 35
    assert torch.equal(flips_for_epoch(base, 1), base)
    assert torch.equal(flips_for_epoch(base, 2), ~base)
    assert torch.equal(flips_for_epoch(base, 3), base)
    images = torch.randint(0, 256, (40, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    data = ImageSet(images.to(torch.uint8), torch.arange(40))
    for epoch in (1, 2):
        mask = flips_for_epoch(base, epoch)
        for x, y in batches(data, 16, flips=mask):
            for xi, yi in zip(x, y, strict=True):
                expected = data.images[yi].flip(2) if mask[yi] else data.images[yi]
                assert torch.equal(xi, expected)


def test_reflect_translate_is_a_window_of_the_reflected_image():
    x = (torch.arange(8 * 3 * 32 * 32) % 251 + 1).view(8, 3, 32, 32).to(torch.uint8)
    out = random_crop(x, 2, torch.Generator().manual_seed(2), pad_mode="reflect")
    padded = F.pad(x.float(), (2, 2, 2, 2), mode="reflect").to(torch.uint8)
    for i in range(8):
        assert any(
            torch.equal(padded[i, :, dy : dy + 32, dx : dx + 32], out[i])
            for dy in range(5)
            for dx in range(5)
        )
    assert (out > 0).all()  # reflection, never zeros


# ------------------------------------------------------------------ whole runs
def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )


def v2_args(data, out, *extra: str) -> list[str]:
    return [
        "train",
        "--recipe",
        "v2",
        "--arch",
        "seednet-small",
        "--data",
        str(data),
        "--limit-per-class",
        "5",
        "--batch-size",
        "25",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--seed",
        "4",
        "--epochs",
        "2",
        # 4 steps in all: the EMA updates every step after the first (ema_start 0.3)
        "--set",
        "ema_every=1",
        *extra,
    ]


@pytest.mark.slow
def test_v2_resumes_exactly_with_its_ema_flips_and_groups(cifar_dir, tmp_path):
    """1 + 1 epochs of v2 equal 2 epochs bit for bit: the lookahead EMA (which starts
    mid-run), the alternating flips (which depend on the epoch), the parameter groups
    and the linear schedule all come back from the checkpoint."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    r = run_cli(*v2_args(cifar_dir, whole))
    assert r.returncode == 0, r.stderr
    config = json.loads((whole / "config.json").read_text())
    assert config["recipe"]["ema_every"] == 1 and config["settings"]["overrides"] == {
        "ema_every": 1
    }
    assert json.loads((whole / "summary.json").read_text())["weights"] == "ema"
    first = run_cli(*v2_args(cifar_dir, split, "--stop-after", "1"))
    assert first.returncode == 0, first.stderr
    second = run_cli(*v2_args(cifar_dir, split, "--resume"))
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stdout
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(split / "model.safetensors"))
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    h1 = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    h2 = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert [h["lr"] for h in h1] == [h["lr"] for h in h2] and h1[-1]["lr"] == 0.0
    # a resume under another recipe is refused
    other = run_cli(*v2_args(cifar_dir, split, "--resume", "--set", "cutout=0"))
    assert other.returncode != 0 and "different recipe" in other.stderr


def test_a_recipe_with_every_field_is_recorded_in_the_manifest(cifar_dir, tmp_path):
    from registry import Registry
    from training.publish import publish_run

    recipe = every_field_recipe()
    settings = TrainSettings(
        recipe="v2",
        overrides=recipe.to_dict(),
        arch="seednet-small",
        data=str(cifar_dir),
        out=str(tmp_path / "run"),
        device="cpu",
        limit_per_class=2,
        seed=0,
    )
    train(settings)
    mv = publish_run(tmp_path / "run", "every", tmp_path / "models", exports=False)
    manifest = Registry(tmp_path / "models").get(f"every@{mv.version}").manifest
    recorded = Recipe.from_dict(manifest.recipe)
    # the run's lr is the batch-scaled one it trained with; everything else is the recipe's
    assert recorded == recipe.apply({"lr": recipe.lr_for(recipe.batch_size)})
    on_disk = json.loads((mv.path / "manifest.json").read_text())["recipe"]
    assert on_disk == manifest.recipe


def _tiny(tmp_path, name: str, **kw) -> TrainSettings:
    base = dict(
        recipe="v2",
        arch="seednet-small",
        data=kw.pop("data"),
        out=str(tmp_path / name),
        device="cpu",
        limit_per_class=2,
        batch_size=10,
        epochs=1,
        checkpoint=False,
        reports=False,
    )
    return TrainSettings(**(base | kw))


def test_runs_sharing_a_sweeps_model_equal_runs_of_their_own(cifar_dir, tmp_path):
    """The sweep re-initialises one model in place for every run: nothing may leak."""
    data = str(cifar_dir)
    cache = RunCache()
    train(_tiny(tmp_path, "a", data=data, seed=1, overrides={"cutout": 0}), cache)
    train(_tiny(tmp_path, "b", data=data, seed=2), cache)
    assert len(cache.models) == 1 and len(cache.data) == 1
    train(_tiny(tmp_path, "alone", data=data, seed=2))
    shared = load_file(str(tmp_path / "b" / "model.safetensors"))
    alone = load_file(str(tmp_path / "alone" / "model.safetensors"))
    assert [k for k in alone if not torch.equal(alone[k], shared[k])] == []


def test_choose_adopts_the_variants_that_beat_the_base():
    def rows(variant, *accs):
        return [{"phase": "ablation", "variant": variant, "test_accuracy": a} for a in accs]

    variants = {
        "v2": {},
        "-a": {"whitening_init": False},
        "-b": {"cutout": 0},
        "-c": {"cutout": 4},
        "fast": {"recipe": "fast"},
    }
    runs = (
        rows("v2", 0.90, 0.92)
        + rows("-a", 0.90, 0.91)  # worse: kept on
        + rows("-b", 0.92, 0.93)  # +1.5 points: adopted
        + rows("-c", 0.915, 0.92)  # +0.75: adopted, but -b's larger gain wins the conflict
        + rows("fast", 0.99, 0.99)  # another recipe: never adopted
    )
    assert choose("v2", runs, variants, margin=0.003) == {"cutout": 0}
    assert choose("v2", runs, variants, margin=0.02) == {}
    assert choose("v2", rows("-a", 0.95), variants, margin=0.0) == {}  # no base: nothing


def test_a_tiny_sweep_prints_one_table(cifar_dir, tmp_path):
    plan = SweepPlan(
        variants={"v2": {}, "-whitening": {"whitening_init": False}},
        ablation_epochs=1,
        ablation_seeds=2,
        final_seeds=2,
        final_epochs=1,
    )
    base = _tiny(tmp_path, "unused", data=str(cifar_dir), epochs=None)
    state = run_sweep(plan, base, tmp_path / "sweep")
    assert [(r["phase"], r["variant"], r["seed"]) for r in state.runs] == [
        ("ablation", "v2", 0),
        ("ablation", "v2", 1),
        ("ablation", "-whitening", 0),
        ("ablation", "-whitening", 1),
        ("final", "final", 0),
        ("final", "final", 1),
    ]
    text = table(state)
    lines = text.splitlines()
    assert "variant" in lines[0] and "flip TTA" in lines[0] and "final train" in lines[0]
    assert sum(1 for x in lines if x.startswith(("v2 ", "-whitening ", "chosen: v2"))) == 3
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(saved["runs"]) == 6 and saved["final_epochs"] == 1
    assert (tmp_path / "sweep" / "table.txt").read_text().strip() == text
    # the first final run measures the loop's overhead against bare steps
    assert state.runs[4]["loop_overhead"] is not None and state.runs[5]["loop_overhead"] is None
    assert (tmp_path / "sweep" / "final" / "final-s1" / "model.safetensors").exists()
    # a budget that cannot hold the final runs skips the rest of the ablation
    tight = SweepPlan(
        variants=plan.variants, ablation_epochs=1, ablation_seeds=1, final_seeds=1, budget=1.0
    )
    state = run_sweep(tight, base, tmp_path / "tight")
    assert state.skipped and "skipped (time budget)" in table(state)
    assert not [r for r in state.runs if r["phase"] == "ablation"]


def test_a_sweep_goes_on_without_torch_compile_when_it_fails(cifar_dir, tmp_path):
    """On the GPU a compiler failure must cost one run, not the whole sweep."""
    plan = SweepPlan(variants={"v2": {}}, ablation_epochs=1, ablation_seeds=1, final_seeds=0)
    base = _tiny(tmp_path, "unused", data=str(cifar_dir), epochs=None)
    base = replace(base, compile=True, compile_mode="no-such-mode")  # torch.compile refuses it
    state = run_sweep(plan, base, tmp_path / "sweep")
    assert [(r["phase"], r["variant"]) for r in state.runs] == [("ablation", "v2")]
    assert any("torch.compile failed" in n for n in state.notes)
    config = json.loads((tmp_path / "sweep" / "ablation" / "v2-s0" / "config.json").read_text())
    assert config["settings"]["compile"] is False


def test_sweep_state_table_reports_mean_and_std():
    state = SweepState()
    for seed, acc in enumerate((0.90, 0.92)):
        state.runs.append(
            {
                "phase": "ablation",
                "variant": "v2",
                "seed": seed,
                "epochs": 4,
                "train_seconds": 10.0 + seed,
                "test_accuracy": acc,
                "test_accuracy_flip_tta": acc + 0.01,
                "final_train_accuracy": 0.5,
                "device": "cpu",
            }
        )
    row = table(state).splitlines()[2]
    assert row.split()[:4] == ["v2", "2", "4", "10.5"]
    assert "91.00 ± 1.41" in row and "92.00" in row and "50.00" in row


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_training_steps_never_sync_with_the_host(cifar_dir, tmp_path):
    from training.train import _wrap, run_steps, setup

    run = setup(_tiny(tmp_path, "sync", data=str(cifar_dir), device="cuda", limit_per_class=20))
    step = _wrap(run)
    run.model.train()
    run_steps(run, step, 1)  # warm-up (cuDNN autotuning may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_steps(run, step, 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_results_split_into_parts_come_back_whole_or_not_at_all(tmp_path):
    """scripts/gpu_lib.sh packs a job's results in parts with SHA256SUMS on the GPU host;
    scripts/gpu_fetch.sh joins them where they were copied, and refuses a part that changed
    on the way."""
    work = tmp_path / "gpu-host"
    (work / "runs" / "r").mkdir(parents=True)
    payload = bytes(range(256)) * 70_000  # 17.9 MB: two parts
    (work / "runs" / "r" / "model.safetensors").write_bytes(payload)
    (work / "runs" / "r" / "summary.json").write_text('{"test_accuracy": 0.5}')
    packed = subprocess.run(
        [
            "bash",
            "-c",
            f". {REPO}/scripts/gpu_lib.sh && OUT=out && mkdir -p out && "
            "pack_results job runs/r/model.safetensors runs/r/summary.json",
        ],
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert packed.returncode == 0, packed.stderr
    parts = sorted(p.name for p in (work / "out").iterdir())
    assert parts == ["SHA256SUMS", "job.tar.part00", "job.tar.part01"]
    fetch = [str(REPO / "scripts" / "gpu_fetch.sh"), str(work / "out")]
    ok = subprocess.run([*fetch, str(tmp_path / "here")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "here" / "runs" / "r" / "model.safetensors").read_bytes() == payload
    with open(work / "out" / "job.tar.part01", "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    bad = subprocess.run([*fetch, str(tmp_path / "bad")], capture_output=True, text=True)
    assert bad.returncode != 0 and "checksum mismatch" in bad.stderr
    assert not (tmp_path / "bad" / "runs").exists()
