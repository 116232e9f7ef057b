"""Decode a micrograph file into an 8-bit grey image.

``decode_image`` reads tif/tiff/png/jpg/jpeg/bmp files of 8 or 16 bits, grey, RGB, RGBA
or palette (Pillow first; TIFFs Pillow cannot read go to tifffile) and returns an 8-bit
grey ('L') PIL image; deeper than 8 bits is stretched min..max. A file that cannot be
used raises :class:`ImageError` whose message is one line with the reason and the fix.
``grey_pixels`` views such an image as a uint8 (H, W) array without copying it where
Pillow allows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

Image.MAX_IMAGE_PIXELS = None  # the pixel limit is data.max_pixels, checked before decoding


class ImageError(ValueError):
    """A file that cannot be used as a micrograph; the message is one line."""


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Grey array of any depth -> uint8; deeper than 8 bits is stretched min..max."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    array = array.astype(np.float64)
    lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
    scaled = (array - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(array)
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def pixel_buffer(image: Image.Image) -> memoryview:
    """The H*W bytes of an 8-bit grey ('L') PIL image, row-major. Shared with the image
    where Pillow can export it (the Arrow C data interface, Pillow >= 11.2: ~10 us), a
    copy otherwise (``tobytes``: ~1 ms for 1024x768)."""
    try:
        array = pa.array(image)
        buffer = memoryview(array.buffers()[1])
        return buffer[array.offset:array.offset + len(array)]
    except (TypeError, ValueError, NotImplementedError, pa.ArrowException):  # older Pillow, multi-block image
        return memoryview(image.tobytes())


def grey_pixels(image: Image.Image) -> np.ndarray:
    """An 8-bit grey ('L') PIL image as a uint8 (H, W) array (read-only where shared)."""
    w, h = image.size
    return np.frombuffer(pixel_buffer(image), np.uint8).reshape(h, w)


def _grey_image(image: Image.Image) -> Image.Image:
    """PIL image of any mode -> 8-bit grey ('L'); 16/32-bit depths are stretched min..max."""
    if image.mode == "L":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image)))
    if image.mode in ("P", "PA", "RGBA", "LA", "CMYK", "YCbCr", "LAB", "HSV", "1", "RGBX", "La"):
        image = image.convert("RGB")
    return image.convert("L")


def _check_size(path: Path, w: int, h: int, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise ImageError(f"{path}: {w}x{h} = {w * h} pixels is over data.max_pixels={max_pixels} "
                         "(decompression bomb?); raise data.max_pixels if the file is genuine")


def _grey_from_tifffile(path: Path, max_pixels: int) -> Image.Image:
    """TIFFs PIL cannot decode (16-bit RGB, float, multi-sample) via tifffile: first page."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        _check_size(path, int(page.imagewidth), int(page.imagelength), max_pixels)
        array = np.asarray(page.asarray())
    if array.ndim == 3:  # (H, W, samples) -> luma of the first 3
        rgb = array[..., :3].astype(np.float64)
        array = rgb @ np.array([0.299, 0.587, 0.114]) if rgb.shape[-1] == 3 else rgb[..., 0]
    if array.ndim != 2:
        raise ImageError(f"{path}: decoded to shape {array.shape}, not a 2-D image; re-export it as grey or RGB")
    return Image.fromarray(_to_uint8(array))


def _decode(path: Path, max_pixels: int) -> Image.Image:
    """PIL first; TIFFs it cannot handle go to tifffile. Raises on any failure."""
    is_tiff = path.suffix.lower() in (".tif", ".tiff")
    try:
        with Image.open(path) as image:
            _check_size(path, *image.size, max_pixels)
            image.load()
            return _grey_image(image)
    except ImageError:
        raise
    except Exception as err:  # noqa: BLE001 -- retried below for TIFF, else re-raised
        if not is_tiff or "truncat" in str(err).lower():
            raise
        try:
            return _grey_from_tifffile(path, max_pixels)
        except ImageError:
            raise
        except Exception:  # noqa: BLE001 -- report PIL's reason, the primary decoder's
            raise err from None


def decode_image(path: str | Path, max_pixels: int) -> Image.Image:
    """Decode any supported image file to an 8-bit grey ('L') PIL image, or raise ImageError."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes); remove it or copy it again")
    try:
        image = _decode(path, max_pixels)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (unrecognised content despite its {path.suffix} extension); "
                         "remove it") from None
    except Exception as err:  # noqa: BLE001 -- any decoder failure is a bad file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageError(f"{path}: corrupt or truncated image ({reason}); re-export or remove it") from None
    if min(image.size) == 0:
        raise ImageError(f"{path}: decoded to size {image.size}, an empty image; re-export it")
    return image


def decode_grey(path: str | Path, max_pixels: int) -> np.ndarray:
    """Decode any supported image file to grey uint8 (H, W), or raise ImageError."""
    return grey_pixels(decode_image(path, max_pixels))
