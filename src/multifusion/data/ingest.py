"""Read micrograph folders and turn each file into the square grey image models see.

``load_micrograph`` is the exact preprocessing of the ``prepare`` stage, used again at
prediction time: decode (tif/tiff/png/jpg/jpeg/bmp; 8/16-bit; grey, RGB, RGBA, palette)
-> grey uint8 -> crop the burnt-in info bar -> centre crop or pad to a square
(``data.aspect``) -> resize to ``data.image_size``. A file that cannot be used raises
:class:`ImageError` whose message is one line with the reason and the fix.

``scan_folder`` (``multifusion.data.layout``) finds the labelled files of an NFFA-style
folder (``<root>/<Class>/*``) or of one already split (``<root>/{train,val,test}/<Class>/*``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, TypeVar

import numpy as np
import pyarrow as pa
import xxhash
from PIL import Image, UnidentifiedImageError
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from multifusion.config import DataConfig
from multifusion.data.infobar import bar_search_start, bar_top
from multifusion.data.layout import IMAGE_EXTENSIONS, Scan, scan_folder  # noqa: F401 -- finding the files is layout's job
from multifusion.data.resample import resize
from multifusion.data.split import perceptual_hash

T = TypeVar("T")
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


def square_box(image: Image.Image, rows: int, aspect: str) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The square of the top ``rows`` of ``image`` (the micrograph above its bar) that
    models see, as (image, box (left, top, right, bottom) in it). aspect='crop': the
    largest centred square, a box in ``image`` itself (no copy); aspect='pad': the top
    rows padded with their median grey to a square, the whole of a new image."""
    w = image.width
    if aspect == "crop":
        side = min(rows, w)
        left, top = (w - side) // 2, (rows - side) // 2
        return image, (left, top, left + side, top + side)
    micrograph = grey_pixels(image)[:rows]  # (rows, W)
    side = max(rows, w)
    square = np.full((side, side), np.median(micrograph), dtype=np.uint8)
    top, left = (side - rows) // 2, (side - w) // 2
    square[top:top + rows, left:left + w] = micrograph
    return Image.fromarray(square), (0, 0, side, side)


class Preprocessed(NamedTuple):
    image: np.ndarray  # uint8 (S, S): what models see
    reduced: np.ndarray  # uint8 (>= 3S, >= 3S): the box-averaged square, for hashing
    bar_rows: int  # rows of info bar cropped from the bottom


def preprocess(image: Image.Image, data: DataConfig, name: str = "image") -> Preprocessed:
    """8-bit grey PIL image -> info bar cropped, squared, resized to data.image_size.

    Resizing is an integer box reduction of the square (Pillow's ``reduce`` on the box,
    without copying the image) to at least 3x the size, then antialiased Lanczos-3 as two
    small matrix products (``resample.resize``; Pillow's weights). Raises ImageError
    (naming ``name``) when the micrograph without its bar is smaller than
    data.image_size: models never see upsampled micrographs."""
    w, h = image.size
    rows = h
    if data.infobar == "auto":  # the bar search reads the bottom rows only, in place
        start = bar_search_start(h)
        rows = start + bar_top(grey_pixels(image)[start:])
    if min(rows, w) < data.image_size:
        raise ImageError(f"{name}: {w}x{rows} after cropping the info bar is smaller than data.image_size="
                         f"{data.image_size}; use the full-size original or lower data.image_size")
    source, box = square_box(image, rows, data.aspect)
    factor = (box[2] - box[0]) // (3 * data.image_size)
    reduced = grey_pixels(source.reduce(factor, box=box) if factor > 1 else source.crop(box))  # (R, R)
    resized = resize(reduced, (data.image_size, data.image_size), "lanczos")  # (S, S)
    return Preprocessed(resized, reduced, h - rows)


def load_micrograph(path: str | Path, data: DataConfig) -> np.ndarray:
    """The file at ``path`` as ``prepare`` stores it: uint8 (S, S), S = data.image_size."""
    return preprocess(decode_image(path, data.max_pixels), data, str(path)).image


@dataclass
class Record:
    """One decoded file: the prepared image and what splitting needs, or the error."""

    path: str
    image: np.ndarray | None = None  # uint8 (S, S)
    sha256: str = ""  # of the prepared image: what models see
    pixel_hash: str = ""  # xxh3-128 of the decoded grey pixels and their shape: exact duplicates
    phash: int = 0
    width: int = 0
    height: int = 0
    bar_rows: int = 0
    error: str = ""


def pixel_hash(image: Image.Image) -> str:
    """128-bit xxh3 of a grey image's size and pixels: equal exactly for pixel-identical
    images (collisions ~2^-64 among 2^32 files), ~30x faster than sha256 on 1024x768."""
    digest = xxhash.xxh3_128(np.asarray(image.size, np.int64).tobytes())
    digest.update(pixel_buffer(image))
    return digest.hexdigest()


def prepare_file(path: str, data: DataConfig) -> Record:
    """Decode and preprocess one file; never raises for a bad file (the error is kept)."""
    try:
        image = decode_image(path, data.max_pixels)
        exact = pixel_hash(image)  # first: it streams every page of the image in, in order
        out = preprocess(image, data, path)
    except (ImageError, OSError) as err:
        return Record(path=path, error=str(err).removeprefix(f"{path}: "))
    # The pHash of the box-reduced square (>= 3x image_size): its 32x32 average is nearly noise-free.
    return Record(path=path, image=out.image, sha256=hashlib.sha256(out.image.data).hexdigest(),
                  pixel_hash=exact, phash=perceptual_hash(out.reduced),
                  width=image.width, height=image.height, bar_rows=out.bar_rows)


def map_files(work: Callable[[str], T], paths: list[str], workers: int, progress: bool = True) -> Iterator[T]:
    """``work(path)`` for every path, in order, on ``workers`` processes (0 = all cores),
    with a progress bar.

    BLAS is held to one thread here, before the worker processes fork, so they inherit
    it: the resize and hash products are small, and a multi-threaded BLAS in each of
    ``cores`` processes oversubscribes the cores (15x slower on 2 cores); a limit set
    in a pool initializer instead leaves each worker an idle BLAS thread spinning at
    ~50% of a core (both measured)."""
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(paths), desc="prepare", unit="img", disable=not progress)
    with threadpool_limits(limits=1, user_api="blas"):
        if workers == 1 or len(paths) < 2 * workers:
            for path in paths:
                yield work(path)
                bar.update()
        else:
            with Pool(workers) as pool:
                for result in pool.imap(work, paths, chunksize=max(1, min(128, len(paths) // (4 * workers)))):
                    yield result
                    bar.update()
    bar.close()


def prepare_files(paths: list[str], data: DataConfig, progress: bool = True) -> Iterator[Record]:
    """``prepare_file`` over all paths on data.workers processes (0 = all cores), in order."""
    return map_files(partial(prepare_file, data=data), paths, data.workers, progress)
