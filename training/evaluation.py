"""Evaluation of a SeedNet on an ImageSet: accuracy, confusion, attention per class."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seednet.constants import CIFAR10_MEAN, CIFAR10_STD
from seednet.graph import Normalize
from training.data import ImageSet, batches


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    flip_tta_accuracy: float | None
    per_class_accuracy: dict[str, float]
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    predictions: list[int]
    # mean attention weights [blocks][branches] for each class (by true and predicted label)
    attention_by_true_class: dict[str, list[list[float]]]
    attention_by_predicted_class: dict[str, list[list[float]]]
    attention_overall: list[list[float]]

    def summary(self) -> dict:
        return {
            "test_loss": self.loss,
            "test_accuracy": self.accuracy,
            "test_accuracy_flip_tta": self.flip_tta_accuracy,
            "per_class_accuracy": self.per_class_accuracy,
        }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: ImageSet,
    batch_size: int = 500,
    autocast: bool = False,
    flip_tta: bool = True,
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
) -> Evaluation:
    """Evaluate ``model`` (on the device of ``data``); fp32 unless ``autocast`` is set."""
    was_training = model.training
    model.eval()
    device = data.images.device
    normalize = Normalize(mean, std).to(device)
    n_classes = len(data.classes)
    total_loss = torch.zeros((), device=device)
    preds: list[Tensor] = []
    tta_preds: list[Tensor] = []
    att_rows: list[Tensor] = []
    for x, y in batches(data, batch_size):
        xf = normalize(x)
        if device.type == "cuda":
            xf = xf.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits, attentions = model(xf)
            if flip_tta:
                logits_flip, _ = model(xf.flip(3))
        logits = logits.float()
        total_loss += F.cross_entropy(logits, y, reduction="sum")
        preds.append(logits.argmax(1))
        if flip_tta:
            tta_preds.append((logits.softmax(1) + logits_flip.float().softmax(1)).argmax(1))
        att = torch.stack([a.float() for a in attentions], dim=1)  # [B, blocks, L]
        att_rows.append(att)
    model.train(was_training)

    labels = data.labels
    pred = torch.cat(preds)
    att_all = torch.cat(att_rows)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.int64, device=device)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    per_class = confusion.diag().float() / confusion.sum(1).clamp(min=1).float()

    def attention_by(index: Tensor) -> dict[str, list[list[float]]]:
        out = {}
        for c, name in enumerate(data.classes):
            rows = att_all[index == c]
            if len(rows):
                out[name] = rows.mean(0).tolist()
        return out

    n = len(data)
    return Evaluation(
        loss=float(total_loss) / n,
        accuracy=float((pred == labels).float().mean()),
        flip_tta_accuracy=(
            float((torch.cat(tta_preds) == labels).float().mean()) if flip_tta else None
        ),
        per_class_accuracy={name: float(per_class[i]) for i, name in enumerate(data.classes)},
        confusion=confusion.tolist(),
        predictions=pred.tolist(),
        attention_by_true_class=attention_by(labels),
        attention_by_predicted_class=attention_by(pred),
        attention_overall=att_all.mean(0).tolist(),
    )


def format_table(ev: Evaluation, title: str = "") -> str:
    """A plain-text accuracy table for the terminal."""
    lines = [title] if title else []
    lines.append(f"{'class':<12}{'accuracy':>10}")
    lines.append("-" * 22)
    for name, acc in ev.per_class_accuracy.items():
        lines.append(f"{name:<12}{acc * 100:>9.2f}%")
    lines.append("-" * 22)
    lines.append(f"{'overall':<12}{ev.accuracy * 100:>9.2f}%")
    if ev.flip_tta_accuracy is not None:
        lines.append(f"{'flip TTA':<12}{ev.flip_tta_accuracy * 100:>9.2f}%")
    lines.append(f"{'loss':<12}{ev.loss:>10.4f}")
    return "\n".join(lines)
