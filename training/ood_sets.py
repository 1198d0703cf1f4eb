"""Out-of-distribution image sets built offline, and corrupted copies of test images.

``python -m training ood-sets --out data/ood`` writes one folder of 32x32 JPEGs (quality
75, like the CIFAR-10 copy) per set, and ``sets.json`` saying what each holds and where
it came from. Nothing is downloaded: the images are procedural, or come from files that
well-known packages ship inside their wheels. The folder is git-ignored (``data/``);
evaluations read it with :func:`load_ood_sets`.

- ``noise-uniform``: every pixel uniform in 0..255 (numpy, seeded);
- ``noise-gaussian``: N(128, 64) per pixel, clipped;
- ``noise-smooth``: uniform noise at 4x4 to 8x8, upscaled bicubic (blobs of colour);
- ``flat-colours``: one random colour per image;
- ``textures``: random crops of brick, grass and gravel (grayscale; scikit-image's
  ``skimage/data``);
- ``photos``: random crops of photos of no CIFAR-10 class: astronaut, camera man, coffee,
  coins, rocket, moon, Hubble deep field, stained tissue, retina, a page of text
  (scikit-image), a temple and a flower (scikit-learn ``load_sample_images``' files),
  Grace Hopper (matplotlib's sample data);
- ``faces``: the 100 faces of scikit-image's Labeled Faces in the Wild subset (its other
  100 images are not faces), 25x25 grayscale, upscaled;
- ``digits``: handwritten digits, 8x8 at 17 grey levels, upscaled (scikit-learn
  ``load_digits``).

The cat (``chelsea``), the horse silhouette and the motorcycle of scikit-image are left
out: they are CIFAR-10 classes or close to one. Crops are resized to 32x32 the way the
service resizes uploads (bicubic, antialiased).

:func:`corrupt` makes the shifted copies of test images used to measure calibration
under shift: Gaussian blur and pixelation (then JPEG again, as any upload).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from seednet.constants import INPUT_SIZE

SETS_FILE = "sets.json"
JPEG_QUALITY = 75
PROCEDURAL = ("noise-uniform", "noise-gaussian", "noise-smooth", "flat-colours")
PACKAGED = ("textures", "photos", "faces", "digits")
ALL_SETS = PROCEDURAL + PACKAGED
# Far from CIFAR-10 in every sense (no natural object photo); "photos" crops are natural
# images of other things, the nearest of these sets.
FAR_OOD = (
    "noise-uniform",
    "noise-gaussian",
    "noise-smooth",
    "flat-colours",
    "textures",
    "faces",
    "digits",
)
CORRUPTIONS = {
    "blur": "Gaussian blur, radius 1 pixel (Pillow GaussianBlur), then JPEG q75",
    "pixelate": "box-downscaled to 10x10 and back to 32x32 by nearest neighbour, then JPEG q75",
}


# ----------------------------------------------------------------- helpers
def to_32(image: Image.Image) -> np.ndarray:
    """An RGB uint8 HWC array of ``image`` resized as the service resizes uploads."""
    im = image.convert("RGB").resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def jpeg_round_trip(hwc: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(hwc).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def random_crops(
    image: Image.Image, count: int, rng: np.random.Generator, min_side: int = 32
) -> list[np.ndarray]:
    """``count`` square crops of random size (from ``min_side`` to the shorter side) and
    place, each resized to 32x32."""
    w, h = image.size
    short = min(w, h)
    out = []
    for _ in range(count):
        side = int(rng.integers(min(min_side, short), short + 1))
        x = int(rng.integers(0, w - side + 1))
        y = int(rng.integers(0, h - side + 1))
        out.append(to_32(image.crop((x, y, x + side, y + side))))
    return out


# ----------------------------------------------------------------- the sets
def _noise_uniform(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    return list(rng.integers(0, 256, (n, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8))


def _noise_gaussian(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    x = rng.normal(128.0, 64.0, (n, INPUT_SIZE, INPUT_SIZE, 3))
    return list(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def _noise_smooth(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        side = int(rng.integers(4, 9))
        small = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        out.append(to_32(Image.fromarray(small)))
    return out


def _flat_colours(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    colours = rng.integers(0, 256, (n, 1, 1, 3), dtype=np.uint8)
    return list(np.broadcast_to(colours, (n, INPUT_SIZE, INPUT_SIZE, 3)).copy())


def _skimage_file(name: str) -> Path:
    import skimage

    path = Path(skimage.__file__).parent / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"scikit-image does not ship {name} in this version")
    return path


def _crops_from(paths: list[Path], n: int, rng: np.random.Generator) -> list[np.ndarray]:
    per_image = [n // len(paths) + (i < n % len(paths)) for i in range(len(paths))]
    out: list[np.ndarray] = []
    for path, count in zip(paths, per_image, strict=True):
        with Image.open(path) as im:
            out += random_crops(im.convert("RGB"), count, rng)
    return out


def _textures(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    return _crops_from([_skimage_file(f) for f in ("brick.png", "grass.png", "gravel.png")], n, rng)


PHOTO_FILES = (
    "astronaut.png",
    "camera.png",
    "coffee.png",
    "coins.png",
    "rocket.jpg",
    "moon.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "retina.jpg",
    "page.png",
)


def _photos(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    import matplotlib.cbook
    import sklearn.datasets

    paths = [_skimage_file(f) for f in PHOTO_FILES]
    sklearn_images = Path(sklearn.datasets.__file__).parent / "images"
    paths += [sklearn_images / "china.jpg", sklearn_images / "flower.jpg"]
    paths.append(Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"sample images not shipped here: {', '.join(missing)}")
    return _crops_from(paths, n, rng)


def _faces(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    # [200, 25, 25] floats in 0..1: the first 100 are faces, the rest are not (a face
    # detection sample), so only the first 100 are used
    faces = np.load(_skimage_file("lfw_subset.npy"))[:100]
    pick = rng.permutation(len(faces))[: min(n, len(faces))]
    return [to_32(Image.fromarray(np.uint8(np.rint(faces[i] * 255)))) for i in pick]


def _digits(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    from sklearn.datasets import load_digits

    images = load_digits().images  # [1797, 8, 8], 0..16
    pick = rng.permutation(len(images))[: min(n, len(images))]
    return [to_32(Image.fromarray(np.uint8(np.rint(images[i] * 255 / 16)))) for i in pick]


BUILDERS: dict[str, Callable[[int, np.random.Generator], list[np.ndarray]]] = {
    "noise-uniform": _noise_uniform,
    "noise-gaussian": _noise_gaussian,
    "noise-smooth": _noise_smooth,
    "flat-colours": _flat_colours,
    "textures": _textures,
    "photos": _photos,
    "faces": _faces,
    "digits": _digits,
}
DESCRIPTIONS = {
    "noise-uniform": "uniform noise, every pixel 0..255 (numpy)",
    "noise-gaussian": "Gaussian noise, mean 128, std 64, clipped (numpy)",
    "noise-smooth": "uniform noise at 4x4 to 8x8 upscaled bicubic to 32x32 (numpy, Pillow)",
    "flat-colours": "one random colour per image (numpy)",
    "textures": "random crops of brick, grass, gravel (scikit-image data, grayscale)",
    "photos": "random crops of 13 photos of no CIFAR-10 class (scikit-image, scikit-learn, "
    "matplotlib sample data)",
    "faces": "the 100 faces of the Labeled Faces in the Wild subset, 25x25 grayscale upscaled "
    "(scikit-image data)",
    "digits": "handwritten digits 8x8 upscaled (scikit-learn load_digits)",
}


def build_ood_sets(
    out: Path, per_set: int = 1000, seed: int = 0, sets: tuple[str, ...] = ALL_SETS
) -> dict:
    """Write every set of ``sets`` under ``out`` (JPEG q75), and ``sets.json``.

    A set whose package is not installed is skipped with the reason recorded. Each set
    has its own generator seeded from ``seed`` and its name, so sets do not depend on
    each other. Returns what ``sets.json`` holds.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index: dict = {"seed": seed, "jpeg_quality": JPEG_QUALITY, "sets": {}, "skipped": {}}
    for name in sets:
        rng = np.random.default_rng([seed, sum(name.encode())])
        try:
            images = BUILDERS[name](per_set, rng)
        except (ImportError, FileNotFoundError) as exc:
            index["skipped"][name] = str(exc)
            continue
        folder = out / name
        folder.mkdir(exist_ok=True)
        for old in folder.glob("*.jpg"):
            old.unlink()
        for i, hwc in enumerate(images):
            (folder / f"{i:05d}.jpg").write_bytes(jpeg_round_trip(hwc))
        index["sets"][name] = {
            "images": len(images),
            "description": DESCRIPTIONS[name],
            "far_ood": name in FAR_OOD,
        }
    (out / SETS_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index


def load_ood_sets(folder: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """Every set under ``folder``: uint8 ``[N, 3, 32, 32]`` images and its description."""
    from training.data import decode_jpeg_bytes

    folder = Path(folder)
    index_path = folder / SETS_FILE
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{index_path} not found: build the sets with `python -m training ood-sets "
            f"--out {folder}`"
        )
    index = json.loads(index_path.read_text())
    out = {}
    for name, info in index["sets"].items():
        files = sorted((folder / name).glob("*.jpg"))
        if len(files) != info["images"]:
            raise FileNotFoundError(
                f"{folder / name} holds {len(files)} images, sets.json says {info['images']}"
            )
        out[name] = (decode_jpeg_bytes([f.read_bytes() for f in files]), info)
    return out


# ----------------------------------------------------------------- corruptions
def _blur(hwc: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(hwc).filter(ImageFilter.GaussianBlur(radius=1.0)))


def _pixelate(hwc: np.ndarray) -> np.ndarray:
    small = Image.fromarray(hwc).resize((10, 10), Image.Resampling.BOX)
    return np.asarray(small.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.NEAREST))


_CORRUPT = {"blur": _blur, "pixelate": _pixelate}


def corrupt_jpegs(images: np.ndarray, kind: str) -> list[bytes]:
    """Corrupted copies of uint8 ``[N, 3, H, W]`` images as JPEG files (see
    :data:`CORRUPTIONS`): what :func:`corrupt` decodes, and what a client would upload."""
    if kind not in _CORRUPT:
        raise ValueError(f"unknown corruption {kind!r}; expected {sorted(_CORRUPT)}")
    hwc = np.ascontiguousarray(np.asarray(images).transpose(0, 2, 3, 1))
    return [jpeg_round_trip(_CORRUPT[kind](x)) for x in hwc]


def corrupt(images: np.ndarray, kind: str) -> np.ndarray:
    """A corrupted copy of uint8 ``[N, 3, H, W]`` images (see :data:`CORRUPTIONS`)."""
    from training.data import decode_jpeg_bytes

    return decode_jpeg_bytes(corrupt_jpegs(images, kind))
