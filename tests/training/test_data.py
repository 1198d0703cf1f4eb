"""Data sources, the packed file and the batched augmentation."""

from __future__ import annotations

import pytest
import torch

from training.data import (
    CIFAR10_CLASSES,
    Augmentation,
    DataError,
    ImageSet,
    batches,
    cutout,
    load_split,
    pack_folder,
    random_crop,
    random_flip,
)


@pytest.fixture(scope="module")
def packed(tmp_path_factory, cifar_dir):
    dest = tmp_path_factory.mktemp("pack") / "cifar10.pack"
    counts = pack_folder(cifar_dir, dest)
    assert counts["train"] == 50_000 and counts["test"] == 10_000
    return dest


def test_class_order_is_the_standard_cifar10_order():
    assert CIFAR10_CLASSES == (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    )


def test_folder_slice_has_labels_in_class_order(cifar_dir):
    data = load_split(cifar_dir, "test", limit_per_class=3)
    assert data.images.shape == (30, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == [c for c in range(10) for _ in range(3)]


def test_packed_file_round_trips_to_identical_pixels_and_labels(cifar_dir, packed):
    for split in ("train", "test"):
        a = load_split(cifar_dir, split, limit_per_class=20)
        b = load_split(packed, split, limit_per_class=20)
        assert torch.equal(a.images, b.images)
        assert torch.equal(a.labels, b.labels)
    assert packed.stat().st_size < 60e6


def test_bad_sources_fail_with_a_reason(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_split(tmp_path / "nope", "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="class folders"):
        load_split(tmp_path, "train")
    junk = tmp_path / "junk.pack"
    junk.write_bytes(b"not a pack")
    with pytest.raises(DataError, match="not a packed"):
        load_split(junk, "test")


def test_augmentation_keeps_shape_dtype_and_labels(cifar_dir):
    data = load_split(cifar_dir, "train", limit_per_class=4)
    gen = torch.Generator().manual_seed(0)
    seen = []
    for x, y in batches(data, 16, gen, Augmentation(cutout=8)):
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32)
        seen.append(y)
    assert sorted(torch.cat(seen).tolist()) == sorted(data.labels.tolist())


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    # distinct values per pixel (mod 251, no zeros), so each window is identified uniquely
    x = (torch.arange(16 * 3 * 32 * 32, dtype=torch.int64) % 251 + 1).view(16, 3, 32, 32)
    x = x.to(torch.uint8)
    gen = torch.Generator().manual_seed(3)
    out = random_crop(x, 4, gen)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    offsets = []
    for i in range(16):
        matches = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if torch.equal(padded[i, :, dy : dy + 32, dx : dx + 32], out[i])
        ]
        assert len(matches) == 1
        offsets.append(matches[0])
    # a crop that returns its input would give (4, 4) everywhere; offsets vary per image
    assert len(set(offsets)) > 4 and any(o != (4, 4) for o in offsets)


def test_random_flip_mirrors_some_images_and_keeps_the_others():
    x = torch.randint(0, 256, (64, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    x = x.to(torch.uint8)
    out = random_flip(x, torch.Generator().manual_seed(5))
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 16 < sum(flipped) < 48  # about half, and never all or none


def test_cutout_zeroes_one_square_per_image_and_nothing_else():
    x = torch.full((8, 3, 32, 32), 200, dtype=torch.uint8)
    out = cutout(x, 8, torch.Generator().manual_seed(1))
    for i in range(8):
        zero = (out[i] == 0).all(0)  # all three channels zeroed together
        assert ((out[i] == 0) == zero).all() and (out[i][:, ~zero] == 200).all()
        ys, xs = zero.nonzero(as_tuple=True)
        assert 0 < len(ys) <= 64
        # a square (clipped by the border): its bounding box is fully zero
        assert zero[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].all()
        assert ys.max() - ys.min() < 8 and xs.max() - xs.min() < 8


def test_shuffling_is_deterministic_given_the_seed(cifar_dir):
    data = ImageSet(torch.zeros(50, 3, 32, 32, dtype=torch.uint8), torch.arange(50))
    order = [
        torch.cat([y for _, y in batches(data, 8, torch.Generator().manual_seed(7))])
        for _ in range(2)
    ]
    assert torch.equal(order[0], order[1])
    assert not torch.equal(order[0], torch.arange(50))


def test_ranks_get_disjoint_shards():
    data = ImageSet(torch.zeros(40, 3, 32, 32, dtype=torch.uint8), torch.arange(40))
    shards = [
        torch.cat(
            [y for _, y in batches(data, 4, torch.Generator().manual_seed(1), rank=r, world_size=2)]
        )
        for r in (0, 1)
    ]
    assert set(shards[0].tolist()).isdisjoint(shards[1].tolist())
    assert len(shards[0]) + len(shards[1]) == 40
