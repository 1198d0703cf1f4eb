"""Real image files, as bytes, for the preprocessing tests.

Every function writes a genuine file with Pillow (or zipfile), so the tests exercise the same
decoders as real uploads. Colours are RGB tuples.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np
from PIL import Image

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)

# EXIF tag 0x0112 = Orientation; 6 = "rotate 90 degrees clockwise to display".
EXIF_ORIENTATION = 0x0112


def _save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """An RGB image of random pixels: incompressible, so truncation always cuts real data."""
    width, height = size
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def empty() -> bytes:
    return b""


def text_file() -> bytes:
    return b"hello, this is a plain text file and not an image\n" * 4


def jpeg(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = RED) -> bytes:
    return _save(Image.new("RGB", size, color), "JPEG", quality=95)


def noise_jpeg(size: tuple[int, int] = (64, 64), seed: int = 0) -> bytes:
    return _save(_noise(size, seed), "JPEG", quality=90)


def truncated_jpeg() -> bytes:
    """A noisy 64x64 JPEG cut in half: valid header, missing scan data."""
    data = noise_jpeg((64, 64))
    return data[: len(data) // 2]


def png(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = RED) -> bytes:
    return _save(Image.new("RGB", size, color), "PNG")


def noise_png(size: tuple[int, int] = (32, 32), seed: int = 0) -> bytes:
    return _save(_noise(size, seed), "PNG")


def truncated_png() -> bytes:
    """A noisy PNG cut in half: IHDR intact, IDAT stream incomplete."""
    data = noise_png((64, 64))
    return data[: len(data) // 2]


def _patch_ihdr(data: bytes, width: int, height: int, fix_crc: bool = True) -> bytes:
    # Layout: 8-byte signature, then the IHDR chunk: length(4) "IHDR"(4) data(13) crc(4).
    # Width and height are the first 8 bytes of the chunk data (offsets 16..24).
    assert data[12:16] == b"IHDR"
    patched = bytearray(data)
    patched[16:24] = struct.pack(">II", width, height)
    if fix_crc:
        # CRC covers chunk type + chunk data, i.e. bytes 12..29.
        patched[29:33] = struct.pack(">I", zlib.crc32(bytes(patched[12:29])) & 0xFFFFFFFF)
    return bytes(patched)


def png_bomb_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG (a few dozen bytes) whose valid IHDR declares ``width`` x ``height``."""
    return _patch_ihdr(png((1, 1), RED), width, height, fix_crc=True)


def png_bad_header_crc() -> bytes:
    """A PNG whose IHDR was edited without fixing the CRC: looks like PNG, header broken."""
    return _patch_ihdr(png((1, 1), RED), 2, 2, fix_crc=False)


def zip_renamed_jpg() -> bytes:
    """A real zip archive (the kind of thing uploaded as ``photo.jpg``)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("photo.jpg", jpeg())
        archive.writestr("readme.txt", "not an image")
    return buf.getvalue()


def cmyk_jpeg(
    size: tuple[int, int] = (64, 48), cmyk: tuple[int, int, int, int] = (0, 255, 255, 0)
) -> bytes:
    """A CMYK JPEG; the default ink (no cyan, full magenta + yellow) is red."""
    return _save(Image.new("CMYK", size, cmyk), "JPEG", quality=95)


def png16(size: tuple[int, int] = (256, 8), value: int | None = None) -> bytes:
    """A 16-bit greyscale (mode ``I;16``) PNG.

    ``value=None``: a horizontal gradient 0..65535; otherwise every pixel is ``value``.
    """
    width, height = size
    if value is None:
        row = np.linspace(0, 65535, width).round().astype(np.uint16)
        pixels = np.tile(row, (height, 1))
    else:
        pixels = np.full((height, width), value, dtype=np.uint16)
    image = Image.fromarray(pixels)
    assert image.mode == "I;16", image.mode
    return _save(image, "PNG")


def animated_gif(
    colors: tuple[tuple[int, int, int], ...] = (RED, BLUE, GREEN), size: tuple[int, int] = (32, 32)
) -> bytes:
    """An animated GIF with one solid frame per colour (frame 0 = ``colors[0]``)."""
    frames = [Image.new("RGB", size, color) for color in colors]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """A 64x32 JPEG (top half red, bottom half blue) tagged with EXIF ``orientation``.

    With orientation 6 the viewer rotates 90 degrees clockwise: the displayed image is 32x64
    with the stored top half (red) on the right and the bottom half (blue) on the left.
    """
    image = Image.new("RGB", (64, 32), BLUE)
    image.paste(RED, (0, 0, 64, 16))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return _save(image, "JPEG", quality=95, exif=exif)


def rgba_png(
    size: tuple[int, int] = (32, 32), color: tuple[int, int, int, int] = (0, 0, 0, 0)
) -> bytes:
    """An RGBA PNG; the default is fully transparent *black*, which must come out white."""
    return _save(Image.new("RGBA", size, color), "PNG")


def la_png(size: tuple[int, int] = (32, 32), value: int = 0, alpha: int = 0) -> bytes:
    """A greyscale + alpha PNG (mode ``LA``)."""
    return _save(Image.new("LA", size, (value, alpha)), "PNG")


def palette_png(
    size: tuple[int, int] = (32, 32), color: tuple[int, int, int] = GREEN, transparent: bool = False
) -> bytes:
    """A palette (mode ``P``) PNG filled with palette entry 1 = ``color``.

    ``transparent=True`` marks entry 1 transparent via a tRNS chunk.
    """
    image = Image.new("P", size, 1)
    image.putpalette([0, 0, 0, *color] + [0, 0, 0] * 254)
    if transparent:
        return _save(image, "PNG", transparency=1)
    return _save(image, "PNG")


def webp(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = BLUE) -> bytes:
    return _save(Image.new("RGB", size, color), "WEBP", lossless=True)


def bmp(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = GREEN) -> bytes:
    return _save(Image.new("RGB", size, color), "BMP")


def gif(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = RED) -> bytes:
    return _save(Image.new("RGB", size, color), "GIF")


def tiff(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = RED) -> bytes:
    """A valid TIFF: a real image, but not a format the service accepts."""
    return _save(Image.new("RGB", size, color), "TIFF")
