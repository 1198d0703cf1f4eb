"""The training CLI on the CPU: artefacts, exact resume, DDP under torchrun, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO

ARTEFACTS = [
    "config.json",
    "metrics.jsonl",
    "checkpoint.pt",
    "model.safetensors",
    "summary.json",
    "confusion_matrix.json",
    "confusion_matrix.png",
    "curves.png",
    "attention_per_class.json",
    "test_predictions.json",
]


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_args(data, out, *extra: str) -> list[str]:
    return [
        "train",
        "--recipe",
        "seed",
        "--arch",
        "seednet-small",
        "--data",
        str(data),
        "--limit-per-class",
        "10",
        "--batch-size",
        "20",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--seed",
        "3",
        *extra,
    ]


def test_two_epochs_lower_the_loss_and_write_every_artefact(cifar_dir, tmp_path):
    out = tmp_path / "run"
    r = run_cli(*train_args(cifar_dir, out, "--epochs", "2"))
    assert r.returncode == 0, r.stderr
    for name in ARTEFACTS:
        assert (out / name).stat().st_size > 0, name
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    for key in ("train_accuracy", "test_loss", "test_accuracy", "lr", "seconds"):
        assert key in history[0]
    summary = json.loads((out / "summary.json").read_text())
    confusion_file = json.loads((out / "confusion_matrix.json").read_text())
    confusion, classes = confusion_file["matrix"], confusion_file["classes"]
    assert sum(map(sum, confusion)) == 100
    # the reported accuracy is the one of the predictions the run wrote, and the confusion's
    preds = json.loads((out / "test_predictions.json").read_text())
    hits = sum(p == y for p, y in zip(preds["predictions"], preds["labels"], strict=True))
    assert summary["test_accuracy"] == pytest.approx(hits / 100)
    assert sum(confusion[i][i] for i in range(10)) == hits
    per_class = summary["per_class_accuracy"]
    assert [per_class[c] for c in classes] == [
        pytest.approx(confusion[i][i] / sum(confusion[i])) for i in range(10)
    ]
    att = json.loads((out / "attention_per_class.json").read_text())
    assert att["blocks"] == 7
    for rows in att["by_true_class"].values():
        assert len(rows) == 7 and all(abs(sum(w) - 1) < 1e-4 for w in rows)
    assert "final model" in r.stdout


@pytest.mark.slow
def test_resume_continues_at_the_right_epoch_with_the_same_result(cifar_dir, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ["--epochs", "2"]
    assert run_cli(*train_args(cifar_dir, whole, *common)).returncode == 0
    first = run_cli(*train_args(cifar_dir, split, *common, "--stop-after", "1"))
    assert first.returncode == 0 and "continue with --resume" in first.stdout
    assert not (split / "model.safetensors").exists()
    second = run_cli(*train_args(cifar_dir, split, *common, "--resume"))
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stdout and "epoch   2/2" in second.stdout
    assert "epoch   1/2" not in second.stdout
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(split / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    lines = (split / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


def fast_args(data, out, *extra: str) -> list[str]:
    args = train_args(data, out, "--batch-size", "25", *extra)
    args[args.index("--recipe") + 1] = "fast"
    args[args.index("--limit-per-class") + 1] = "5"
    return args


@pytest.mark.slow
def test_fast_recipe_resumes_exactly_with_its_ema_and_schedule(cifar_dir, tmp_path):
    """The shipped models use `fast` (one-cycle lr, EMA of the weights, label smoothing).

    Catches a resume that drops the EMA state, the schedule's position or an RNG: the
    final weights (the EMA's) of 1 + 1 epochs must equal those of 2 epochs bit for bit.
    """
    whole, split = tmp_path / "whole", tmp_path / "split"
    r = run_cli(*fast_args(cifar_dir, whole, "--epochs", "2"))
    assert r.returncode == 0, r.stderr
    assert json.loads((whole / "summary.json").read_text())["weights"] == "ema"
    history = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert all(h["ema_test_accuracy"] is not None for h in history)
    assert history[0]["lr"] != history[1]["lr"]  # the one-cycle schedule moves
    first = run_cli(*fast_args(cifar_dir, split, "--epochs", "2", "--stop-after", "1"))
    assert first.returncode == 0, first.stderr
    second = run_cli(*fast_args(cifar_dir, split, "--epochs", "2", "--resume"))
    assert second.returncode == 0, second.stderr
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(split / "model.safetensors"))
    assert a.keys() == b.keys()
    assert [k for k in a if not (a[k] == b[k]).all()] == []
    resumed = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert [h["lr"] for h in resumed] == [h["lr"] for h in history]


@pytest.mark.slow
def test_the_reported_accuracy_is_that_of_the_published_ema_weights(cifar_dir, tmp_path):
    """`fast` publishes the EMA of the weights; summary.json (and so the registry's
    manifest) must report what those weights score, not what the raw weights score.

    Three epochs of 10 images per class: the EMA (decay 0.999) is still near the first
    steps' weights while the raw weights have learnt something, so the two differ.
    """
    from training.data import load_split
    from training.evaluation import evaluate
    from training.loading import load_model
    from training.publish import publish_run
    from training.train import TrainSettings, train

    run = tmp_path / "run"
    settings = TrainSettings(
        recipe="fast",
        arch="seednet-small",
        data=str(cifar_dir),
        out=str(run),
        epochs=3,
        batch_size=20,
        device="cpu",
        limit_per_class=10,
        seed=3,
        reports=False,
    )
    summary = train(settings)
    assert summary["weights"] == "ema"
    mv = publish_run(run, "ema", tmp_path / "registry", exports=False)
    published, _ = load_model(mv.path)  # through the registry, checksums verified
    raw, _ = load_model(run / "checkpoint.pt")  # the trained weights of the last epoch
    test_set = load_split(cifar_dir, "test", settings.limit_per_class)
    assert summary["test_images"] == len(test_set) == 100

    ema = evaluate(published, test_set)
    assert summary["test_accuracy"] == ema.accuracy
    assert summary["test_accuracy_flip_tta"] == ema.flip_tta_accuracy
    assert summary["test_loss"] == pytest.approx(ema.loss, rel=1e-6)
    assert summary["per_class_accuracy"] == ema.per_class_accuracy
    # (the manifest keeps the fraction; the evaluation a float32 mean of it)
    assert mv.manifest.metrics.test_accuracy == pytest.approx(ema.accuracy, rel=1e-6)

    trained = evaluate(raw, test_set)
    assert trained.accuracy != ema.accuracy, "this run no longer tells the two weights apart"
    assert summary["test_accuracy"] != trained.accuracy


@pytest.mark.slow
def test_torchrun_two_processes_on_gloo(cifar_dir, tmp_path):
    out = tmp_path / "ddp"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "training",
            *train_args(cifar_dir, out, "--epochs", "1"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert (out / "model.safetensors").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent/cifar", "--out", "/tmp/x"], "does not exist"),
        (["--recipe", "nope", "--out", "/tmp/x"], "invalid choice"),
        (["--epochs", "0", "--out", "/tmp/x"], "at least 1"),
        (["--batch-size", "-3", "--out", "/tmp/x"], "at least 1"),
        (["--register", "../escape", "--out", "/tmp/x"], "invalid name"),
    ],
    ids=["missing-data", "unknown-recipe", "zero-epochs", "negative-batch", "bad-register"],
)
def test_bad_cli_input_exits_non_zero_with_one_line(args, message):
    r = run_cli("train", *args, timeout=120)
    assert r.returncode != 0
    lines = [x for x in r.stderr.strip().splitlines() if "Warning" not in x and x.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_evaluate_prints_an_accuracy_table(cifar_dir, tiny_run):
    r = run_cli(
        "evaluate",
        str(tiny_run),
        "--data",
        str(cifar_dir),
        "--limit-per-class",
        "5",
        "--device",
        "cpu",
    )
    assert r.returncode == 0, r.stderr
    assert "overall" in r.stdout and "truck" in r.stdout and "flip TTA" in r.stdout
