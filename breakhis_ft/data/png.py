"""Reading image files: checks of a PNG's structure, made at scan time so that a bad file is found
before any model loads (a full decode of BreakHis costs minutes; these cost about 0.6 ms an image),
and the full decode that training and prediction share.

Limits and conversions decided here:
- Size: an image of more than `max_pixels` pixels (data.max_image_pixels, 25 megapixels by
  default: 5000x5000, 75 MB decoded; BreakHis images are 0.32) is a bad file, named and skipped or
  refused like a corrupt one, never decoded. PIL's own decompression-bomb limit (about 179
  megapixels) is the most it can be raised to.
- 16-bit and other high-depth greyscale images (PIL modes I;16, I, F: 10-, 12- and 16-bit
  microscopy exports) are scaled by their real range: the image's minimum becomes 0 and its
  maximum 255 (a linear stretch), so a 12-bit image stored in 16 bits is not read as black or,
  clipped, as white. A constant image becomes black. 16-bit RGB PNGs are read by PIL as 8-bit RGB
  (the high byte) and need nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from breakhis_ft.errors import BadDataError

SIGNATURE = b"\x89PNG\r\n\x1a\n"
END = b"IEND\xaeB`\x82"  # the IEND chunk's type and CRC: the last 8 bytes of a complete PNG
MAX_IMAGE_PIXELS = 25_000_000  # data.max_image_pixels's default (see the module docstring)
# the most data.max_image_pixels may be: above it PIL refuses to open an image (DecompressionBomb)
PIL_PIXEL_LIMIT = 2 * int(Image.MAX_IMAGE_PIXELS or 89_478_485)
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_READ_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError)


def check_pixel_limit(max_pixels: int | None) -> None:
    """Refuse a data.max_image_pixels that is not positive or above what PIL can open."""
    if max_pixels is not None and not 0 < max_pixels <= PIL_PIXEL_LIMIT:
        raise ValueError(
            f"data.max_image_pixels={max_pixels}: must be between 1 and {PIL_PIXEL_LIMIT} "
            "(PIL's decompression-bomb limit)"
        )


def _too_large(size: tuple[int, int], max_pixels: int | None) -> str | None:
    width, height = size
    if max_pixels is None or width * height <= max_pixels:
        return None
    return (
        f"image too large ({width}x{height} = {width * height:,} pixels, above "
        f"data.max_image_pixels={max_pixels:,}; raise it to read such images)"
    )


def _bomb(path: Path, err: Exception, max_pixels: int | None) -> str:
    """The message for an image PIL refuses to open as a decompression bomb: its size from the
    PNG header where there is one, else PIL's own words."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] == SIGNATURE and head[12:16] == b"IHDR":
        size = (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"))
        return _too_large(size, max_pixels or PIL_PIXEL_LIMIT) or f"image too large ({err})"
    return f"image too large ({err})"


def _verify(path: Path, max_pixels: int | None) -> str | None:
    """PIL's verify (every chunk's length and CRC up to IEND, no decoding) and the size."""
    try:
        with Image.open(path) as img:
            if problem := _too_large(img.size, max_pixels):
                return problem
            img.verify()
    except Image.DecompressionBombError as err:
        return _bomb(path, err, max_pixels)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        return f"corrupt or truncated PNG ({err})"
    return None


def png_problem(
    path: str | Path, checksums: bool = True, max_pixels: int | None = MAX_IMAGE_PIXELS
) -> str | None:
    """What is wrong with a PNG file (empty, not a PNG, truncated, corrupt, too large), or None.

    The signature and the end chunk are read (two small reads); `checksums` (the default) also
    checks every chunk's CRC and the image's size from its header, which finds corrupt bytes
    anywhere (inside the image data too) and oversized images.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            f.seek(max(size - len(END), 0))
            tail = f.read(len(END))
    except OSError as err:
        return f"unreadable ({err})"
    if size == 0:
        return "empty file (0 bytes)"
    if head != SIGNATURE:
        return "not a PNG file (no PNG signature)"
    if tail != END or checksums:
        # a file that does not end on IEND may still be whole with bytes after it: verify decides
        return _verify(path, max_pixels)
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of a decoded image; high-depth greyscale scaled by its own range first."""
    if image.mode not in HIGH_DEPTH_MODES:
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if high > low:
        scaled = np.round((values - low) * (255.0 / (high - low)))
    else:
        scaled = np.zeros_like(values)
    return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")


def load_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Decode an image fully as RGB (see `to_rgb`); unreadable, truncated or (with `max_pixels`)
    oversized files raise BadDataError naming the file."""
    try:
        with Image.open(path) as img:
            problem = _too_large(img.size, max_pixels)
            if problem is None:
                img.load()  # decode now: a truncated PNG fails here rather than later in a worker
                return to_rgb(img)
    except Image.DecompressionBombError as e:
        raise BadDataError(f"{path}: {_bomb(Path(path), e, max_pixels)}") from e
    except _READ_ERRORS as e:
        raise BadDataError(f"{path}: unreadable or truncated image ({e})") from e
    raise BadDataError(f"{path}: {problem}")
