"""CIFAR-10 sources behind one interface, plus batched tensor augmentation.

Sources (all give the standard class order and uint8 ``[N, 3, 32, 32]`` pixels):

- a JPEG ImageFolder copy (``train/<class>/*.jpg``, ``test/<class>/*.jpg``),
- ``torchvision.datasets.CIFAR10`` (``torchvision:ROOT`` downloads into ROOT),
- a packed single file of the JPEG bytes (``python -m training pack-data``), so a
  remote GPU machine receives one ~57 MB file instead of 60,000 small ones.

Images are decoded once per run and kept as uint8 tensors; augmentation works
on whole batches on whatever device holds them (the GPU during training).
"""

from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from seednet.constants import CIFAR10_CLASSES

SPLITS = ("train", "test")
DATA_ENV = "SEEDNET_CIFAR10"
DEFAULT_DATA = "../shared/cifar10"  # the JPEG copy, beside the checkout
PACK_MAGIC = b"SEEDNET-CIFAR-PACK\n"
TORCHVISION_PREFIX = "torchvision:"


class DataError(ValueError):
    """A data source that cannot be read; the message says why."""


@dataclass
class ImageSet:
    """Decoded images of one split, in memory."""

    images: Tensor  # uint8 [N, 3, 32, 32]
    labels: Tensor  # int64 [N]
    classes: tuple[str, ...] = CIFAR10_CLASSES
    description: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> ImageSet:
        return ImageSet(
            self.images.to(device), self.labels.to(device), self.classes, self.description
        )


def default_source() -> str:
    """Where CIFAR-10 is unless told: ``$SEEDNET_CIFAR10``, else ``../shared/cifar10``.

    The one rule for the CLI, the tests and the benchmarks.
    """
    return os.environ.get(DATA_ENV) or DEFAULT_DATA


# ----------------------------------------------------------------- decoding
def decode_jpeg_bytes(blobs: Sequence[bytes], workers: int | None = None) -> np.ndarray:
    """Decode encoded images to uint8 ``[N, 3, H, W]`` with Pillow (what the service uses)."""

    def one(blob: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(blob)) as im:
            return np.asarray(im.convert("RGB"))

    if not blobs:
        return np.zeros((0, 3, 32, 32), dtype=np.uint8)
    # Pillow releases the GIL while decoding, so threads use every core.
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        arrays = list(pool.map(one, blobs, chunksize=256))
    return np.stack(arrays).transpose(0, 3, 1, 2).copy()


# ----------------------------------------------------------------- the calibration split
def within_class_index(labels: np.ndarray) -> np.ndarray:
    """Each image's position among the images of its class, in load order (for the JPEG
    folder: sorted file names within the class folder)."""
    labels = np.asarray(labels)
    index = np.zeros(len(labels), dtype=np.int64)
    seen: dict[int, int] = {}
    for i, y in enumerate(labels.tolist()):
        index[i] = seen.get(y, 0)
        seen[y] = index[i] + 1
    return index


def holdout_rule(fraction: float) -> str:
    return (
        f"within each class folder (sorted file names), image i is held out when "
        f"floor((i + 1) * {fraction}) > floor(i * {fraction})"
    )


def holdout_mask(labels: np.ndarray, fraction: float) -> np.ndarray:
    """The calibration split of a training set: ``fraction`` of each class, spread evenly
    over the class (image i of a class is held out when floor((i+1)f) > floor(i f): for
    f = 0.1, images 9, 19, 29, ...). Deterministic, so it is recomputed from the data."""
    if not 0 <= fraction < 1:
        raise ValueError(f"calibration_fraction must be in [0, 1), got {fraction}")
    i = within_class_index(labels)
    return np.floor((i + 1) * fraction) > np.floor(i * fraction)


def split_calibration(data: ImageSet, fraction: float) -> tuple[ImageSet, ImageSet]:
    """(training images, held-out calibration images) of a training split (see
    :func:`holdout_mask`); the held-out part is empty when ``fraction`` is 0 or the
    split is too small to hold out one image of a class."""
    mask = torch.from_numpy(holdout_mask(data.labels.cpu().numpy(), fraction)).to(
        data.images.device
    )
    keep, held = ~mask, mask
    describe = {k: v for k, v in data.description.items() if k != "count"}
    train = ImageSet(
        data.images[keep],
        data.labels[keep],
        data.classes,
        describe | {"count": int(keep.sum()), "calibration_held_out": int(held.sum())},
    )
    calibration = ImageSet(
        data.images[held],
        data.labels[held],
        data.classes,
        describe | {"count": int(held.sum())},
    )
    return train, calibration


def _take_per_class(labels: Sequence[int], limit: int | None) -> list[int]:
    """Indices of the first ``limit`` items of each class, in their original order."""
    if limit is None:
        return list(range(len(labels)))
    seen: dict[int, int] = {}
    keep = []
    for i, y in enumerate(labels):
        if seen.get(y, 0) < limit:
            seen[y] = seen.get(y, 0) + 1
            keep.append(i)
    return keep


# ----------------------------------------------------------------- sources
def _folder_files(root: Path, split: str) -> tuple[list[Path], list[int]]:
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{root} has no '{split}' folder (expected {split}/<class>/*.jpg)")
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if tuple(found) != CIFAR10_CLASSES:
        raise DataError(f"{split_dir} must hold the 10 CIFAR-10 class folders, found {found}")
    files: list[Path] = []
    labels: list[int] = []
    for y, name in enumerate(CIFAR10_CLASSES):
        class_files = sorted(p for p in (split_dir / name).iterdir() if p.is_file())
        files += class_files
        labels += [y] * len(class_files)
    return files, labels


def _load_folder(root: Path, split: str, limit: int | None) -> ImageSet:
    files, labels = _folder_files(root, split)
    keep = _take_per_class(labels, limit)
    blobs = [files[i].read_bytes() for i in keep]
    images = decode_jpeg_bytes(blobs)
    return ImageSet(
        torch.from_numpy(images),
        torch.tensor([labels[i] for i in keep], dtype=torch.int64),
        description={"source": "jpeg-folder", "path": str(root), "split": split},
    )


def _read_pack_header(f) -> dict:
    magic = f.read(len(PACK_MAGIC))
    if magic != PACK_MAGIC:
        raise DataError(f"{getattr(f, 'name', 'file')} is not a packed CIFAR-10 file")
    (size,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(size))


def _load_pack(path: Path, split: str, limit: int | None) -> ImageSet:
    with open(path, "rb") as f:
        header = _read_pack_header(f)
        base = f.tell()
        if split not in header["splits"]:
            raise DataError(f"{path} holds no '{split}' split")
        info = header["splits"][split]
        labels, lengths = info["labels"], info["lengths"]
        offsets = np.concatenate([[0], np.cumsum(lengths)]) + base + info["offset"]
        keep = _take_per_class(labels, limit)
        blobs = []
        for i in keep:
            f.seek(int(offsets[i]))
            blobs.append(f.read(lengths[i]))
    if tuple(header["classes"]) != CIFAR10_CLASSES:
        raise DataError(f"{path} has classes {header['classes']}, not CIFAR-10's")
    return ImageSet(
        torch.from_numpy(decode_jpeg_bytes(blobs)),
        torch.tensor([labels[i] for i in keep], dtype=torch.int64),
        description={
            "source": "packed",
            "path": str(path),
            "split": split,
            "packed_from": header.get("source"),
        },
    )


def _load_torchvision(root: str, split: str, limit: int | None) -> ImageSet:
    from torchvision.datasets import CIFAR10

    ds = CIFAR10(root, train=split == "train", download=True)
    if tuple(ds.classes) != CIFAR10_CLASSES:
        raise DataError(f"torchvision CIFAR10 classes differ: {ds.classes}")
    keep = _take_per_class(list(ds.targets), limit)
    images = torch.from_numpy(np.ascontiguousarray(ds.data[keep].transpose(0, 3, 1, 2)))
    labels = torch.tensor([ds.targets[i] for i in keep], dtype=torch.int64)
    return ImageSet(
        images, labels, description={"source": "torchvision", "path": root, "split": split}
    )


def load_split(source: str | Path, split: str, limit_per_class: int | None = None) -> ImageSet:
    """Load one split ("train" or "test") from any of the three sources.

    ``source`` is a JPEG folder, a packed file, or ``torchvision:ROOT``.
    ``limit_per_class`` keeps the first K images of each class (tests, smoke runs).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    if limit_per_class is not None and limit_per_class < 1:
        raise DataError("--limit-per-class must be at least 1")
    text = str(source)
    if text.startswith(TORCHVISION_PREFIX):
        result = _load_torchvision(
            text[len(TORCHVISION_PREFIX) :] or "data", split, limit_per_class
        )
    else:
        path = Path(text)
        if path.is_file():
            result = _load_pack(path, split, limit_per_class)
        elif path.is_dir():
            result = _load_folder(path, split, limit_per_class)
        else:
            raise DataError(
                f"data source {text!r} does not exist (a JPEG folder, a packed "
                f"file or torchvision:ROOT)"
            )
    result.description["count"] = len(result)
    if limit_per_class is not None:
        result.description["limit_per_class"] = limit_per_class
    return result


def check_source(source: str | Path) -> None:
    """Fail fast, with a one-line reason, before any heavy work."""
    text = str(source)
    if text.startswith(TORCHVISION_PREFIX):
        return
    path = Path(text)
    if path.is_file():
        with open(path, "rb") as f:
            _read_pack_header(f)
    elif path.is_dir():
        for split in SPLITS:
            _folder_files(path, split)
    else:
        raise DataError(f"data source {text!r} does not exist")


def pack_folder(src: Path, dest: Path) -> dict:
    """Pack a JPEG ImageFolder copy into one file of its raw bytes (no re-encoding)."""
    header: dict = {"format": 1, "classes": list(CIFAR10_CLASSES), "source": str(src), "splits": {}}
    blobs: list[bytes] = []
    offset = 0
    for split in SPLITS:
        files, labels = _folder_files(src, split)
        data = [p.read_bytes() for p in files]
        lengths = [len(b) for b in data]
        header["splits"][split] = {"labels": labels, "lengths": lengths, "offset": offset}
        offset += sum(lengths)
        blobs += data
    encoded = json.dumps(header).encode()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(PACK_MAGIC)
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for b in blobs:
            f.write(b)
    os.replace(tmp, dest)
    return {split: len(header["splits"][split]["labels"]) for split in SPLITS} | {
        "bytes": dest.stat().st_size
    }


# ----------------------------------------------------------------- tensors
@dataclass(frozen=True)
class Augmentation:
    """The report's augmentation (pad + random crop, horizontal flip), plus optional cutout.

    ``pad_mode`` is how the translate pads ("zeros", the report's, or "reflect").
    """

    crop_padding: int = 4
    flip: bool = True
    cutout: int = 0  # side of a zeroed square (0 = off)
    pad_mode: str = "zeros"

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if self.crop_padding:
            x = random_crop(x, self.crop_padding, generator, self.pad_mode)
        if self.flip:
            x = random_flip(x, generator)
        if self.cutout:
            x = cutout(x, self.cutout, generator)
        return x


def _reflect(index: Tensor, size: int) -> Tensor:
    """Indices of a reflection about the border without repeating it (numpy's "reflect"):
    -1 -> 1, size -> size - 2."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def random_crop(
    x: Tensor, padding: int, generator: torch.Generator, pad_mode: str = "zeros"
) -> Tensor:
    """Pad by ``padding`` (zeros or a reflection) and take a random crop of the original
    size, per image: a random translation by up to ``padding`` pixels each way.

    The reflection is an index map into the image itself (any dtype, any device)."""
    if pad_mode not in ("zeros", "reflect"):
        raise ValueError(f"unknown pad_mode {pad_mode!r}")
    n, _, h, w = x.shape
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    if pad_mode == "reflect":
        return x[batch, chans, _reflect(rows - padding, h), _reflect(cols - padding, w)]
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    return padded[batch, chans, rows, cols]


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def alternating_flips(n: int, seed: int) -> Tensor:
    """Each image's flip in odd epochs (random, drawn once per run from ``seed``); even
    epochs flip the others (:func:`flips_for_epoch`). airbench's alternating flip: every
    image is seen both ways round in every pair of epochs, instead of by chance."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=generator) < 0.5


def flips_for_epoch(base: Tensor, epoch: int) -> Tensor:
    """The flip mask of (1-based) ``epoch``: ``base`` in odd epochs, its inverse in even."""
    return base if epoch % 2 == 1 else ~base


def cutout(x: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """Zero a ``size`` x ``size`` square at a random centre (may overlap the border)."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=generator, device=x.device)
    cx = torch.randint(0, w, (n,), generator=generator, device=x.device)
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_y = (ys >= (cy - size // 2)[:, None]) & (ys < (cy - size // 2 + size)[:, None])
    in_x = (xs >= (cx - size // 2)[:, None]) & (xs < (cx - size // 2 + size)[:, None])
    mask = in_y[:, :, None] & in_x[:, None, :]
    return x.masked_fill(mask[:, None], 0)


def batches(
    data: ImageSet,
    batch_size: int,
    generator: torch.Generator | None = None,
    augmentation: Augmentation | None = None,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    flips: Tensor | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (uint8 images, labels) batches; shuffled and augmented when a generator is given.

    With ``world_size > 1`` every rank draws the same permutation and takes its own
    interleaved shard, so ranks see disjoint images (DistributedSampler's scheme).
    ``flips`` (a bool per image of ``data``) mirrors those images before augmentation.
    """
    n = len(data)
    device = data.images.device
    if generator is not None:
        order = torch.randperm(n, generator=generator, device=generator.device).to(device)
    else:
        order = torch.arange(n, device=device)
    order = order[rank::world_size]
    stop = len(order)
    if drop_last and stop >= batch_size:  # a slice smaller than one batch still trains
        stop -= stop % batch_size
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        x = data.images[idx]
        if flips is not None:
            x = torch.where(flips[idx][:, None, None, None], x.flip(3), x)
        if augmentation is not None and generator is not None:
            x = augmentation(x, generator)
        yield x, data.labels[idx]
