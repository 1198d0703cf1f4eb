"""Tests for service.dataplane.images, driven by real files from tests/image_factory.py."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from service.dataplane.images import (
    ImageLimits,
    PreparedImage,
    decode_image,
    decode_opened,
    open_image,
    preprocess,
    to_model_input,
    to_rgb,
)
from service.errors import (
    CorruptImageError,
    EmptyFileError,
    FileTooLargeError,
    ImageError,
    TooManyPixelsError,
    UnsupportedImageError,
    failure_of,
)
from tests import image_factory as make

LIMITS = ImageLimits()


def http_status(err: Exception) -> int:
    return failure_of(err).http


def channel_means(array: np.ndarray) -> tuple[float, float, float]:
    r, g, b = (float(array[c].mean()) for c in range(3))
    return r, g, b


def assert_model_input(prepared: PreparedImage) -> None:
    assert prepared.array.shape == (3, 32, 32)
    assert prepared.array.dtype == np.uint8
    assert prepared.array.flags["C_CONTIGUOUS"]


def assert_solid(prepared: PreparedImage, rgb: tuple[int, int, int], tol: int = 3) -> None:
    assert_model_input(prepared)
    expected = np.array(rgb, dtype=np.int16).reshape(3, 1, 1)
    diff = np.abs(prepared.array.astype(np.int16) - expected)
    assert diff.max() <= tol, f"expected {rgb}, got means {channel_means(prepared.array)}"


def expect_error(data: bytes, cls: type[ImageError], limits: ImageLimits = LIMITS):
    with pytest.raises(cls) as info:
        preprocess(data, limits)
    assert type(info.value) is cls
    return info.value


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any pixel decoding fail loudly: proves a check happened from the header only."""

    def forbidden(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", forbidden)


# --- exception classes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "status", "code"),
    [
        (EmptyFileError, 422, "empty_file"),
        (FileTooLargeError, 413, "file_too_large"),
        (TooManyPixelsError, 413, "too_many_pixels"),
        (UnsupportedImageError, 415, "unsupported_media_type"),
        (CorruptImageError, 422, "corrupt_image"),
    ],
)
def test_error_classes_carry_status_and_code(cls: type[ImageError], status: int, code: str) -> None:
    err = cls()
    assert isinstance(err, ImageError)
    assert http_status(err) == status
    assert err.code == code
    assert err.message and str(err) == err.message
    assert str(cls("custom text")) == "custom text"


def test_limits_are_frozen_and_validated() -> None:
    assert LIMITS.max_bytes == 10 * 1024 * 1024
    assert LIMITS.max_pixels == 4096 * 4096  # see ImageLimits: why this number
    assert LIMITS.max_request_pixels == 2 * 4096 * 4096
    with pytest.raises(dataclasses.FrozenInstanceError):
        LIMITS.max_bytes = 1  # type: ignore[misc]
    with pytest.raises(ValueError):
        ImageLimits(max_bytes=0)


# --- refusals -----------------------------------------------------------------------------


def test_empty_file() -> None:
    err = expect_error(make.empty(), EmptyFileError)
    assert http_status(err) == 422


def test_too_many_bytes_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden_open(*args: object, **kwargs: object) -> None:
        raise AssertionError("Image.open was called")

    data = make.jpeg()
    monkeypatch.setattr(Image, "open", forbidden_open)
    err = expect_error(data, FileTooLargeError, ImageLimits(max_bytes=len(data) - 1))
    assert http_status(err) == 413


def test_file_exactly_at_byte_limit_is_accepted() -> None:
    data = make.jpeg()
    assert_model_input(preprocess(data, ImageLimits(max_bytes=len(data))))


def test_png_bomb_header_is_refused_without_decoding(no_decoding: None) -> None:
    # no_decoding makes any decode fail the test: the refusal comes from the header alone
    data = make.png_bomb_header(100_000, 100_000)
    assert len(data) < 200
    err = expect_error(data, TooManyPixelsError)
    assert http_status(err) == 413


def test_pixel_limit_is_our_own_below_pillows_global_guard(no_decoding: None) -> None:
    # 8000 x 6000 = 48M pixels: over our 16.8M default, under Pillow's global 89M guard.
    data = make.png_bomb_header(8000, 6000)
    err = expect_error(data, TooManyPixelsError)
    assert "8000x6000" in err.message


def test_pixel_limit_is_per_call_and_globals_untouched() -> None:
    global_limit = Image.MAX_IMAGE_PIXELS
    data = make.png((20, 20))
    expect_error(data, TooManyPixelsError, ImageLimits(max_pixels=399))
    assert_model_input(preprocess(data, ImageLimits(max_pixels=400)))
    assert_model_input(preprocess(data, LIMITS))
    assert global_limit == Image.MAX_IMAGE_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_warning_raised_as_error_is_mapped(no_decoding: None) -> None:
    # 10000 x 10000 is between Pillow's warning (89M) and error (179M) thresholds; with a
    # generous per-call limit only Pillow's warning (escalated to an error) can refuse it.
    data = make.png_bomb_header(10_000, 10_000)
    expect_error(data, TooManyPixelsError, ImageLimits(max_pixels=10**12))


@pytest.mark.parametrize(
    "factory", [make.zip_renamed_jpg, make.text_file, make.tiff], ids=lambda f: f.__name__
)
def test_unsupported_files(factory) -> None:
    err = expect_error(factory(), UnsupportedImageError)
    assert http_status(err) == 415
    assert err.code == "unsupported_media_type"


@pytest.mark.parametrize(
    "factory",
    [make.truncated_jpeg, make.truncated_png, make.png_bad_header_crc],
    ids=lambda f: f.__name__,
)
def test_corrupt_files(factory) -> None:
    err = expect_error(factory(), CorruptImageError)
    assert http_status(err) == 422
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --- accepted formats and modes -------------------------------------------------------------


def test_red_jpeg() -> None:
    prepared = preprocess(make.jpeg((64, 48), make.RED), LIMITS)
    assert_model_input(prepared)
    r, g, b = channel_means(prepared.array)
    assert r > 240 and g < 15 and b < 15
    assert prepared.original_size == (64, 48)
    assert prepared.format == "JPEG"
    assert prepared.mode == "RGB"


def test_cmyk_jpeg_is_converted() -> None:
    prepared = preprocess(make.cmyk_jpeg(), LIMITS)
    assert prepared.mode == "CMYK"
    r, g, b = channel_means(prepared.array)
    assert r > 200 and g < 40 and b < 40


def test_png16_mid_grey_is_scaled_not_clipped() -> None:
    prepared = preprocess(make.png16(value=32768), LIMITS)
    assert prepared.mode == "I;16"
    assert_solid(prepared, (128, 128, 128), tol=0)


def test_png16_gradient_spans_full_8bit_range() -> None:
    image = decode_image(make.png16((256, 8)), LIMITS)
    row = np.asarray(image)[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0)
    assert len(np.unique(row)) > 200  # scaled, not clipped to a handful of values


def test_animated_gif_uses_first_frame() -> None:
    prepared = preprocess(make.animated_gif((make.RED, make.BLUE, make.GREEN)), LIMITS)
    assert prepared.format == "GIF"
    assert_solid(prepared, make.RED)


def test_exif_orientation_is_applied() -> None:
    image = decode_image(make.exif_rotated_jpeg(6), LIMITS)
    assert image.size == (32, 64)  # stored 64x32, displayed rotated
    prepared = preprocess(make.exif_rotated_jpeg(6), LIMITS)
    assert prepared.original_size == (32, 64)
    left, right = prepared.array[:, :, :12], prepared.array[:, :, 20:]
    # Orientation 6 = rotate 90 degrees clockwise: stored top (red) ends up on the right.
    assert channel_means(right)[0] > 200 and channel_means(right)[2] < 50
    assert channel_means(left)[2] > 200 and channel_means(left)[0] < 50


def test_rgba_fully_transparent_becomes_white() -> None:
    prepared = preprocess(make.rgba_png(color=(0, 0, 0, 0)), LIMITS)
    assert prepared.mode == "RGBA"
    assert_solid(prepared, (255, 255, 255), tol=0)


def test_rgba_half_transparent_red_is_composited_on_white() -> None:
    prepared = preprocess(make.rgba_png(color=(255, 0, 0, 128)), LIMITS)
    assert_solid(prepared, (255, 127, 127), tol=1)


def test_rgba_opaque_keeps_colour() -> None:
    assert_solid(preprocess(make.rgba_png(color=(0, 0, 255, 255)), LIMITS), make.BLUE, tol=0)


def test_la_transparent_becomes_white_and_opaque_stays_black() -> None:
    transparent = preprocess(make.la_png(value=0, alpha=0), LIMITS)
    assert transparent.mode == "LA"
    assert_solid(transparent, (255, 255, 255), tol=0)
    assert_solid(preprocess(make.la_png(value=0, alpha=255), LIMITS), (0, 0, 0), tol=0)


def test_palette_png_goes_through_palette() -> None:
    prepared = preprocess(make.palette_png(color=make.GREEN), LIMITS)
    assert prepared.mode == "P"
    assert_solid(prepared, make.GREEN, tol=0)


def test_palette_png_with_transparency_becomes_white() -> None:
    prepared = preprocess(make.palette_png(color=make.GREEN, transparent=True), LIMITS)
    assert_solid(prepared, (255, 255, 255), tol=0)


@pytest.mark.parametrize(
    ("factory", "fmt", "color"),
    [
        (make.webp, "WEBP", make.BLUE),
        (make.bmp, "BMP", make.GREEN),
        (make.gif, "GIF", make.RED),
        (make.png, "PNG", make.RED),
    ],
    ids=["webp", "bmp", "gif", "png"],
)
def test_other_allowed_formats(factory, fmt: str, color: tuple[int, int, int]) -> None:
    prepared = preprocess(factory(color=color), LIMITS)
    assert prepared.format == fmt
    assert prepared.original_size == (64, 48)
    assert_solid(prepared, color)


# --- resizing -----------------------------------------------------------------------------------


def test_32x32_png_passes_through_pixel_identical() -> None:
    data = make.noise_png((32, 32), seed=7)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)
    prepared = preprocess(data, LIMITS)
    np.testing.assert_array_equal(prepared.array, expected)


def test_resize_squashes_whole_image_without_crop() -> None:
    # 64x32, left half red, right half blue: squashed (not cropped) to 32x32 both halves stay.
    image = Image.new("RGB", (64, 32), make.BLUE)
    image.paste(make.RED, (0, 0, 32, 32))
    array = to_model_input(image)
    assert array.shape == (3, 32, 32) and array.dtype == np.uint8
    assert channel_means(array[:, :, :14])[0] > 250
    assert channel_means(array[:, :, 18:])[2] > 250


def test_large_noise_downscale_is_antialiased() -> None:
    # Antialiased downscaling of random noise averages towards mid-grey; point sampling
    # would keep the full 0..255 spread.
    array = to_model_input(Image.open(io.BytesIO(make.noise_png((512, 512)))))
    assert array.shape == (3, 32, 32)
    assert array.std() < 20


def test_custom_size() -> None:
    assert preprocess(make.jpeg(), LIMITS, size=64).array.shape == (3, 64, 64)


def test_to_rgb_integer_and_float_modes() -> None:
    as_i = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert np.asarray(to_rgb(as_i))[0, :, 0].tolist() == [0, 128, 255]
    as_f = Image.fromarray(np.array([[-5.0, 127.6, 300.0]], dtype=np.float32))
    assert np.asarray(to_rgb(as_f))[0, :, 0].tolist() == [0, 128, 255]


def test_module_does_not_change_pillow_globals_on_import() -> None:
    # A fresh interpreter: importing the module must leave Pillow's global limits alone.
    code = (
        "from PIL import Image, ImageFile\n"
        "before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)\n"
        "import service.dataplane.images\n"
        "assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


# --- real CIFAR-10 files --------------------------------------------------------------------


@pytest.mark.parametrize("label", ["airplane", "cat", "ship", "truck"])
def test_cifar_jpegs_pass_through_unchanged(label: str, cifar_dir: Path) -> None:
    path = cifar_dir / "test" / label / "0000.jpg"
    expected = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
    prepared = preprocess(path.read_bytes(), LIMITS)
    assert prepared.original_size == (32, 32)
    np.testing.assert_array_equal(prepared.array, expected)


# --- decoding less: JPEG draft mode and integer reduce ----------------------------------------


def _photo_like(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Smooth colour regions plus pixel noise: closer to a photo than flat noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.integers(0, 256, (h // 40 + 2, w // 40 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC))
    noisy = smooth.astype(np.int16) + rng.integers(-20, 21, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _full_decode_then_resize(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC)).transpose(2, 0, 1)


@pytest.mark.parametrize(
    "fmt, size, decoded",
    [
        ("JPEG", (256, 256), (128, 128)),  # draft 1/2
        ("JPEG", (1000, 700), (250, 175)),  # 1/4: 700 is not divisible by 8
        ("JPEG", (1920, 1080), (240, 135)),  # 1/8
        ("JPEG", (4032, 3024), (504, 378)),  # a 12 MP phone photo
        ("JPEG", (1001, 701), (1001, 701)),  # no exact scale: decoded in full
        ("PNG", (1000, 700), (1000, 700)),  # reduce after decoding (no draft for PNG)
        ("PNG", (1920, 1080), (1920, 1080)),  # reduce by 4
    ],
)
def test_draft_and_reduce_stay_close_to_a_full_decode(fmt, size, decoded) -> None:
    buf = io.BytesIO()
    _photo_like(size).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    opened = open_image(buf.getvalue(), LIMITS)
    assert opened.source.size == decoded and opened.decode_pixels == decoded[0] * decoded[1]
    prepared = decode_opened(opened)
    assert prepared.original_size == size  # the upload's size, not the decoded one
    diff = np.abs(prepared.array.astype(int) - _full_decode_then_resize(buf.getvalue()))
    assert diff.max() <= 3 and diff.mean() <= 0.35, (diff.max(), diff.mean())


@pytest.mark.parametrize("maker", [make.jpeg, make.noise_jpeg, make.noise_png, make.png])
def test_small_images_decode_exactly_as_before(maker) -> None:
    data = maker()
    opened = open_image(data, LIMITS)
    assert opened.source.size == Image.open(io.BytesIO(data)).size  # no draft
    np.testing.assert_array_equal(decode_opened(opened).array, _full_decode_then_resize(data))


def test_draft_keeps_exif_orientation_and_the_displayed_size() -> None:
    image = _photo_like((1024, 512))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, exif=exif)
    opened = open_image(buf.getvalue(), LIMITS)
    assert opened.source.size == (256, 128)  # drafted at 1/4
    prepared = decode_opened(opened)
    assert prepared.original_size == (512, 1024)
    full = Image.open(io.BytesIO(buf.getvalue()))
    upright = np.asarray(
        ImageOps.exif_transpose(full).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
    ).transpose(2, 0, 1)
    assert np.abs(prepared.array.astype(int) - upright).max() <= 3
