"""Turn uploaded bytes into the uint8 ``[3, 32, 32]`` array the CIFAR-10 graph expects.

Pipeline (:func:`preprocess` = :func:`open_image` + :func:`decode_opened`)::

    bytes -> size checks -> Image.open (header only) -> pixel check -> JPEG draft
          -> load (decode) -> integer reduce -> EXIF orientation -> RGB
          -> resize to size x size -> uint8 [3, H, W]

The service calls the two halves separately (``service.dataplane.decoding``): it opens every image
of a request first, so that the request's decode budget (the sum of decoded pixels) is
checked before a single image is decoded.

Every refusal is a :class:`~service.errors.ImageError` subclass with a machine-readable ``code``
(the service maps each class to an HTTP status); this module knows nothing about FastAPI.

Checks, cheapest first, so that hostile input costs as little as possible:

1. empty body -> :class:`EmptyFileError` (422);
2. more than ``ImageLimits.max_bytes`` -> :class:`FileTooLargeError` (413), before Pillow
   sees a single byte;
3. ``Image.open`` restricted to :data:`ALLOWED_FORMATS`; anything else (zip, text, TIFF, ...)
   -> :class:`UnsupportedImageError` (415). Data that *starts* like an allowed format but
   whose header is broken is reported as :class:`CorruptImageError` (422) instead;
4. width x height from the header > ``ImageLimits.max_pixels`` -> :class:`TooManyPixelsError`
   (413). ``Image.open`` is lazy, so nothing has been decoded or allocated yet. Pillow's own
   global bomb guard (``Image.MAX_IMAGE_PIXELS``) may fire first for absurd sizes; it is mapped
   to the same error. This module never changes Pillow's global settings;
5. ``im.load()`` decodes; truncated or broken data -> :class:`CorruptImageError` (422).
   ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left at ``False`` so Pillow refuses truncated files
   instead of silently padding them with grey.

Decoding less than the whole image, where the result stays (nearly) the same:

- JPEG, draft mode: libjpeg decodes at 1/2, 1/4 or 1/8 scale straight from the DCT
  coefficients (``Image.draft``), so a 12-megapixel photo costs 0.2 megapixels. The scale
  is the largest that divides both sides exactly (no partial edge block shifts the
  geometry) and keeps at least :data:`DRAFT_MIN_SIDE` (4 x 32) pixels on the short side,
  so the final bicubic resize still averages several source pixels per output pixel.
  Against a full decode + the same resize this changes pixels slightly: at most 3 grey
  levels, 0.1-0.3 on average, on photos from 256 px to 4032x3024 (measured, and asserted
  in tests/service/test_preprocessing.py). Images under 256 px on the short side,
  32x32 CIFAR images included, are decoded exactly as before.
- Other formats, ``Image.reduce``: after decoding, a box average by an integer factor that
  divides both sides and keeps at least :data:`REDUCE_MIN_SIDE` (8 x 32) pixels on the short
  side, before the resize. At most 1 grey level from resizing the full image, and the
  resize runs on a small image (4096x4096 -> 32x32: 0.13 s -> 0.02 s). Colour-keyed
  transparency is reduced only after compositing, alpha after premultiplying (Pillow).

Animated GIFs (and other multi-frame files) use their first frame only.

Mode conversion to RGB (:func:`to_rgb`):

- ``RGB``: unchanged.
- ``1``, ``L``, ``P`` (no transparency): Pillow's conversion; palette images go through their
  palette, greyscale is replicated to the three channels.
- Transparent images (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, ``P``/``L``/``RGB``
  with a ``transparency`` key) are composited onto a **white** background. Transparent pixels
  have arbitrary (often black) colour values; white is what browsers show on a default page,
  so the model sees what the user saw, e.g. a black logo on a transparent icon stays a black
  logo instead of vanishing into a black background.
- ``CMYK`` (and ``YCbCr``, ``HSV``): Pillow's conversion to RGB (no colour management).
- 16/32-bit integer modes (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, ``I``) are *scaled* to 8 bit
  according to their bit depth, not clipped: clipping would turn almost every 16-bit image
  white. ``I;16*`` are divided by 257 (65535 -> 255, 32768 -> 128). ``I`` is what Pillow uses
  for 16-bit data in some decoders, so it is scaled as 16-bit when all values fit in
  0..65535 and as 32-bit (divide by 2**24) otherwise; negative values are clipped to 0.
- ``F`` (float): values are assumed to be on the 0..255 scale, rounded and clipped to 0..255.

Resizing (:func:`to_model_input`): the whole image is resized to ``size x size`` with bicubic
interpolation. There is no crop and the aspect ratio is **not** preserved: CIFAR-10 images are
square full-object photos, and a crop could cut the object out. Pillow's bicubic resize widens
its kernel when downscaling, so large images are antialiased rather than aliased. An image that
is already ``size x size`` is returned pixel-identical.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import (
    CorruptImageError,
    EmptyFileError,
    FileTooLargeError,
    TooManyPixelsError,
    UnsupportedImageError,
)

__all__ = [
    "ALLOWED_FORMATS",
    "ImageFile",
    "ImageLimits",
    "OpenedImage",
    "PreparedImage",
    "decode_image",
    "decode_opened",
    "open_image",
    "preprocess",
    "to_model_input",
    "to_rgb",
]

# Pillow format names. MPO (multi-picture JPEG from phones) is opened by the JPEG plugin.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF")

# Magic numbers of the allowed formats: used only to tell "broken PNG" (422) from
# "not an image we take" (415) when Pillow cannot identify the data.
_SIGNATURES: tuple[tuple[str, bytes], ...] = (
    ("JPEG", b"\xff\xd8\xff"),
    ("PNG", b"\x89PNG\r\n\x1a\n"),
    ("GIF", b"GIF87a"),
    ("GIF", b"GIF89a"),
    ("BMP", b"BM"),
)

# What Pillow's decoders raise on broken data (besides OSError for truncation).
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    struct.error,
)

_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


# Draft/reduce targets, as multiples of the model's input side (see the module docstring).
DRAFT_FACTOR = 4
REDUCE_FACTOR = 8


@dataclass(frozen=True)
class ImageLimits:
    """Decode limits.

    ``max_pixels`` bounds width * height of one image as declared in its header. The
    default, 4096 x 4096 = 16,777,216 pixels, takes any camera or phone photo (12 MP is
    4032 x 3024) and 4K frames, and caps one PNG/WebP/BMP/GIF decode at 64 MiB (RGBA);
    for a 32x32 classifier anything larger is a downscale of more than 128x that adds
    nothing but cost. ``max_request_pixels`` bounds the sum over a request of the pixels
    the decoder will produce (JPEGs after draft mode): two full-size images, or 64 phone
    photos (0.19 MP each in draft mode), or thousands of CIFAR-sized ones.
    """

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_request_pixels: int = 2 * 4096 * 4096

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0 or self.max_request_pixels <= 0:
            raise ValueError(f"limits must be positive, got {self!r}")


@dataclass(frozen=True)
class ImageFile:
    """An encoded image as a client sent it: an upload, or one element of a protocol's
    BYTES tensor. ``name`` labels errors and answers (the upload's file name)."""

    name: str | None
    data: bytes


@dataclass
class PreparedImage:
    """A decoded upload ready for the model.

    ``array``: uint8 ``[3, size, size]`` (RGB, not normalised).
    ``original_size``: ``(width, height)`` as displayed, i.e. after EXIF orientation, before
    resizing. ``format``: Pillow's format name (``"JPEG"``, ``"PNG"``, ...). ``mode``: the
    Pillow mode of the decoded image before conversion to RGB (``"P"``, ``"I;16"``, ...).
    """

    array: np.ndarray
    original_size: tuple[int, int]
    format: str
    mode: str


def _sniff_allowed_format(data: bytes) -> str | None:
    for name, magic in _SIGNATURES:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _format_mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Validate and decode ``data`` in full; an RGB image with EXIF orientation applied.

    Raises a :class:`ImageError` subclass; see the module docstring for the order.
    """
    image, _, _ = _decode(_open(data, limits), 0)
    return image


@dataclass
class OpenedImage:
    """An image whose header passed the checks, not decoded yet (see :func:`open_image`).

    ``decode_pixels``: what decoding will produce (after JPEG draft mode): the cost a
    request's budget counts.
    """

    source: Image.Image
    header_size: tuple[int, int]
    decode_pixels: int


def open_image(data: bytes, limits: ImageLimits, size: int = 32) -> OpenedImage:
    """Checks 1-4 of the module docstring, and JPEG draft mode; nothing is decoded yet."""
    source = _open(data, limits)
    header_size = source.size
    if source.format == "JPEG":
        scale = _exact_scale(header_size, DRAFT_FACTOR * size, (8, 4, 2))
        if scale > 1:
            # Pillow picks the largest scale with a result >= the requested size, which
            # for a request of exactly (w/scale, h/scale) is that scale.
            source.draft(source.mode, (header_size[0] // scale, header_size[1] // scale))
    return OpenedImage(source, header_size, source.size[0] * source.size[1])


def decode_opened(opened: OpenedImage, size: int = 32) -> PreparedImage:
    """Decode an opened image into the model input (steps 5 on)."""
    rgb, source, original_size = _decode(opened.source, size, opened.header_size)
    return PreparedImage(
        array=to_model_input(rgb, size),
        original_size=original_size,
        format=source.format or "unknown",
        mode=source.mode,
    )


def _exact_scale(dims: tuple[int, int], min_side: int, candidates: tuple[int, ...]) -> int:
    """The largest candidate dividing both sides that keeps ``min_side`` pixels, else 1."""
    w, h = dims
    for s in candidates:
        if s > 1 and w % s == 0 and h % s == 0 and min(w, h) // s >= min_side:
            return s
    return 1


def _reduced(image: Image.Image, size: int) -> Image.Image:
    """``image`` box-averaged by an exact integer factor (see the module docstring)."""
    if size <= 0:
        return image
    w, h = image.size
    limit = min(w, h) // (REDUCE_FACTOR * size)
    factor = _exact_scale(image.size, REDUCE_FACTOR * size, tuple(range(limit, 1, -1)))
    return image.reduce(factor) if factor > 1 else image


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    if not data:
        raise EmptyFileError()
    if len(data) > limits.max_bytes:
        raise FileTooLargeError(
            f"the file is {_format_mb(len(data))}; the limit is {_format_mb(limits.max_bytes)}"
        )

    try:
        # Lazy: reads the header only. formats= makes Pillow refuse other formats up front.
        source = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except _BOMB_ERRORS as err:
        raise TooManyPixelsError(f"the image has too many pixels ({err})") from err
    except (UnidentifiedImageError, *_DECODE_ERRORS) as err:
        sniffed = _sniff_allowed_format(data)
        if sniffed is not None:
            raise CorruptImageError(
                f"the file looks like {sniffed} but its header is broken"
            ) from err
        raise UnsupportedImageError(
            f"not a supported image; accepted formats: {', '.join(ALLOWED_FORMATS)}"
        ) from err

    width, height = source.size
    if width * height > limits.max_pixels:
        raise TooManyPixelsError(
            f"the image is {width}x{height} = {width * height:,} pixels; "
            f"the limit is {limits.max_pixels:,}"
        )
    return source


def _decode(
    source: Image.Image, size: int, header_size: tuple[int, int] | None = None
) -> tuple[Image.Image, Image.Image, tuple[int, int]]:
    """``(rgb_image, loaded_source, original_size)`` of an opened image.

    ``size`` > 0 allows an integer reduce towards ``size x size``; 0 keeps every pixel.
    ``original_size`` is ``header_size`` (the size before draft mode) as displayed, i.e.
    with EXIF orientation applied.
    """
    header_size = header_size or source.size
    try:
        source.load()  # decodes frame 0 only; truncated data raises OSError here
    except _BOMB_ERRORS as err:
        raise TooManyPixelsError(f"the image has too many pixels ({err})") from err
    except _DECODE_ERRORS as err:
        raise CorruptImageError(f"the {source.format} data is truncated or corrupt") from err

    image = source
    # Before the mode conversion where averaging commutes with it (not with a colour key).
    early = source.mode in ("RGB", "L", "RGBA", "LA") and "transparency" not in source.info
    if early:
        image = _reduced(image, size)
    try:
        oriented = ImageOps.exif_transpose(image)
    except _DECODE_ERRORS:
        # A broken EXIF block should not reject an image whose pixels are fine; browsers
        # also ignore unreadable orientation tags.
        oriented = image
    turned = oriented.size == image.size[::-1] and image.size[0] != image.size[1]
    original_size = header_size[::-1] if turned else header_size

    try:
        rgb = to_rgb(oriented)
    except ValueError as err:
        raise UnsupportedImageError(f"unsupported image mode {oriented.mode!r}") from err
    if not early:
        rgb = _reduced(rgb, size)
    return rgb, source, (int(original_size[0]), int(original_size[1]))


def _integer_to_l(image: Image.Image) -> Image.Image:
    """Scale an ``I;16*`` / ``I`` image to 8-bit ``L`` by its bit depth (no clipping)."""
    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        wide = values.astype(np.uint32)
        scaled = (wide + 128) // 257  # round(v / 257): 0 -> 0, 65535 -> 255
    else:  # "I": int32
        clipped = np.clip(values.astype(np.int64), 0, None)
        fits_16_bit = clipped.max(initial=0) <= 0xFFFF
        scaled = (clipped + 128) // 257 if fits_16_bit else clipped >> 24
    return Image.fromarray(scaled.astype(np.uint8))


def _has_transparency(image: Image.Image) -> bool:
    return "A" in image.getbands() or image.info.get("transparency") is not None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB as described in the module docstring."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16") or mode == "I":
        return _integer_to_l(image).convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    if _has_transparency(image):
        rgba = image.convert("RGBA")  # applies palette / colour-key transparency
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def to_model_input(image: Image.Image, size: int = 32) -> np.ndarray:
    """Resize ``image`` to ``size x size`` (bicubic, no crop) and return uint8 ``[3, size, size]``.

    Non-RGB images are converted with :func:`to_rgb` first.
    """
    rgb = to_rgb(image)
    if rgb.size != (size, size):
        # Bicubic in Pillow is a convolution whose support scales with the reduction
        # factor, so downscaling is antialiased.
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    hwc = np.asarray(rgb, dtype=np.uint8)
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def preprocess(data: bytes, limits: ImageLimits, size: int = 32) -> PreparedImage:
    """Validate, decode and resize an upload; see the module docstring."""
    return decode_opened(open_image(data, limits, size), size)
