"""PNG figures of a run: training curves and the confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: Sequence[dict], path: Path) -> None:
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    # the test set is evaluated every --eval-every epochs only
    tested = [h for h in history if "test_loss" in h]
    t_epochs = [h["epoch"] for h in tested]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(t_epochs, [h["test_loss"] for h in tested], label="test")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross entropy")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * h["train_accuracy"] for h in history], label="train")
    ax_acc.plot(t_epochs, [100 * h["test_accuracy"] for h in tested], label="test")
    # the EMA may start late in the run (recipe field ema_start)
    ema = [h for h in tested if h.get("ema_test_accuracy") is not None]
    if ema:
        ax_acc.plot(
            [h["epoch"] for h in ema],
            [100 * h["ema_test_accuracy"] for h in ema],
            label="test (EMA)",
        )
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.legend()
    ax_acc.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max(max(row) for row in confusion) or 1
    for i, row in enumerate(confusion):
        for j, v in enumerate(row):
            ax.text(
                j,
                i,
                str(v),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if v > top / 2 else "black",
            )
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(panels: Sequence[tuple[str, dict]], path: Path) -> None:
    """Reliability diagrams side by side: per confidence bin, the accuracy (bars) against
    the mean confidence (the diagonal is perfect calibration); the share of images in each
    bin below. Each panel is (title, ``training.calibrate`` reliability dict)."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        2,
        len(panels),
        figsize=(4 * len(panels), 5.2),
        gridspec_kw={"height_ratios": [3, 1]},
        squeeze=False,
    )
    for col, (title, r) in enumerate(panels):
        ax, ax_n = axes[0][col], axes[1][col]
        edges = r["edges"]
        width = edges[1] - edges[0]
        left = edges[:-1]
        acc = [a if a is not None else 0.0 for a in r["accuracy"]]
        conf = [c if c is not None else 0.0 for c in r["confidence"]]
        filled = [n > 0 for n in r["counts"]]
        ax.bar(left, acc, width=width, align="edge", edgecolor="black", label="accuracy")
        gaps = [(c - a) if f else 0.0 for a, c, f in zip(acc, conf, filled, strict=True)]
        ax.bar(
            left,
            gaps,
            bottom=acc,
            width=width,
            align="edge",
            color="tab:red",
            alpha=0.3,
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{title}\nECE {100 * r['ece']:.2f} %", fontsize=9)
        ax.set_ylabel("accuracy")
        ax.legend(loc="upper left", fontsize=7)
        total = sum(r["counts"]) or 1
        ax_n.bar(left, [n / total for n in r["counts"]], width=width, align="edge")
        ax_n.set_xlim(0, 1)
        ax_n.set_xlabel("confidence (winning probability)")
        ax_n.set_ylabel("share")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
