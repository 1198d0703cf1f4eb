"""A rollout's labelled check set: the candidate's accuracy on it, before any traffic.

The set is a folder on the serving host in ImageFolder layout (``<class name>/<image>``,
e.g. a slice of the CIFAR-10 test set); at most ``per_class`` images of each class
(sorted by name, so every process reads the same ones) are preprocessed exactly as
``/predict`` preprocesses an upload, then run on the model thread between batches.
A prediction is right when its class name is the folder's, so a version whose outputs
carry the wrong names fails like one with the wrong weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from registry.errors import InvalidRolloutError
from registry.rollouts import CheckSet
from service.dataplane.batching import Batcher
from service.dataplane.images import ImageLimits, preprocess
from service.dataplane.served import ServingModel
from service.errors import ImageError


@dataclass(frozen=True)
class CheckImages:
    pixels: np.ndarray  # uint8 [N, 3, 32, 32]
    labels: list[str]
    skipped: int  # files that are not usable images


def load_check_set(check: CheckSet, limits: ImageLimits) -> CheckImages:
    """The check set's images and labels (blocking file I/O: run it on a worker thread);
    InvalidRolloutError when the folder holds no labelled image."""
    folder = Path(check.folder)
    if not folder.is_dir():
        raise InvalidRolloutError(f"the check set folder {check.folder} is not a folder here")
    arrays, labels, skipped = [], [], 0
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.iterdir() if p.is_file())[: check.per_class]
        for path in files:
            try:
                arrays.append(preprocess(path.read_bytes(), limits).array)
            except (ImageError, OSError):
                skipped += 1
                continue
            labels.append(class_dir.name)
    if not arrays:
        raise InvalidRolloutError(
            f"the check set folder {check.folder} holds no image in a class folder "
            "(<class name>/<image>)"
        )
    return CheckImages(np.stack(arrays), labels, skipped)


async def accuracy(model: ServingModel, images: CheckImages, batcher: Batcher) -> float:
    """The share of ``images`` whose top-1 class name is their folder's."""
    unknown = sorted(set(images.labels) - set(model.class_names))
    if unknown:
        raise InvalidRolloutError(
            f"the check set has class folders that are no class of {model.ref}: "
            f"{', '.join(unknown[:5])}"
        )
    right = 0
    step = batcher.max_batch_size
    for start in range(0, len(images.labels), step):
        chunk = images.pixels[start : start + step]
        outputs = await batcher.run_in_model_thread(model.backend.run, chunk, kind="check")
        top = np.asarray(outputs["probabilities"]).argmax(axis=1).tolist()
        truth = images.labels[start : start + step]
        right += sum(model.class_names[i] == label for i, label in zip(top, truth, strict=True))
    return right / len(images.labels)
