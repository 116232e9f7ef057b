"""Benchmark: prepare's decode + info-bar crop + square + resize on all cores, against
the floor of the work -- a plain PIL open + grey + resize loop on one core -- over the
same 1024x768 8-bit TIFFs (like the NFFA originals), in the same run.

    python bench/prepare.py [--images 1000] [--size 64] [--repeat 5]

Target: decode+crop+resize (``load_micrograph``, what ``prepare`` stores per file) on all
cores >= 0.8 x (floor x cores). Also printed: the stage's whole per-file work
(``prepare_file``: that plus the exact-duplicate, stored-image and perceptual hashes),
and the same floor loop on all cores in a process pool -- how far this machine's cores
scale at all.
"""

import argparse
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from multifusion.core.config import load_config
from multifusion.data.ingest import Record, prepare_file
from multifusion.data.parallel import parallel_map
from multifusion.data.preprocess import load_micrograph
from multifusion.data.synthesize import CLASSES, render_image


def make_tiffs(folder: Path, n: int) -> list[str]:
    """``n`` distinct 1024x768 8-bit grey TIFFs with info bars, from 10 rendered scenes."""
    scenes = [render_image(0, c, 0, 1024, 768) for c in CLASSES]
    paths = []
    for i in range(n):
        image = np.roll(scenes[i % len(scenes)][:700], 37 * i, axis=1)  # shift the content,
        image = np.concatenate([image, scenes[i % len(scenes)][700:]])  # keep the bar rows
        path = folder / f"m{i:04d}.tif"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    return paths


def floor_one(path: str, size: int) -> np.ndarray:
    """Plain PIL: open, grey, resize (Lanczos after an integer reduce, as fast as Pillow
    goes at full quality), to numpy."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L").resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0))


def floor_loop(paths: list[str], size: int) -> float:
    """The floor on one core. Returns seconds."""
    start = time.perf_counter()
    for path in paths:
        floor_one(path, size)
    return time.perf_counter() - start


def pool_run(work, paths: list[str], workers: int) -> float:
    """``work`` over all paths on ``workers`` processes the way ``prepare`` maps files
    (``parallel_map``: same chunks, one BLAS thread each). Returns seconds."""
    start = time.perf_counter()
    results = list(parallel_map(work, paths, workers, progress=False))
    seconds = time.perf_counter() - start
    records = [r for r in results if isinstance(r, Record)]
    assert all(not r.error and r.bar_rows > 0 for r in records), "a benchmark file failed or lost its bar"
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5, help="rounds; each row keeps its fastest")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    data = load_config(args.params, {"data.image_size": args.size}).data
    floor = partial(floor_one, size=args.size)
    micrograph, per_file = partial(load_micrograph, data=data), partial(prepare_file, data=data)
    runs = [  # (what, cores, timed run); each round runs all of them, in this order
        ("PIL open+grey+resize (floor)", 1, lambda paths: floor_loop(paths, args.size)),
        ("PIL floor in a process pool (this machine)", cores, lambda paths: pool_run(floor, paths, cores)),
        ("prepare decode+crop+resize", 1, lambda paths: pool_run(micrograph, paths, 1)),
        ("prepare decode+crop+resize", cores, lambda paths: pool_run(micrograph, paths, cores)),
        ("prepare per file: + 3 hashes", 1, lambda paths: pool_run(per_file, paths, 1)),
        ("prepare per file: + 3 hashes", cores, lambda paths: pool_run(per_file, paths, cores)),
    ]
    best = [float("inf")] * len(runs)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_tiffs(Path(tmp), args.images)
        floor_loop(paths, args.size)  # warm the page cache
        for _ in range(args.repeat):
            for i, (_, _, run) in enumerate(runs):
                best[i] = min(best[i], run(paths))
    n = args.images
    rate = {(what, c): n / seconds for (what, c, _), seconds in zip(runs, best)}  # images/s
    ideal = rate["PIL open+grey+resize (floor)", 1] * cores
    rows = list(rate.items())
    rows.insert(1, (("floor x cores (ideal)", cores), ideal))
    load = os.getloadavg()[0]
    print(f"{n} TIFFs 1024x768 8-bit -> {args.size}x{args.size}, {cores} cores, best of {args.repeat} rounds, "
          f"load average {load:.1f} (a load above the core count makes the all-core rows unreliable)")
    print(f"{'what':44s} {'cores':>5s} {'images/s':>9s} {'vs floor x cores':>17s}")
    for (what, c), images_per_s in rows:
        print(f"{what:44s} {c:5d} {images_per_s:9.1f} {images_per_s / ideal:17.2f}")
    ours = rate["prepare decode+crop+resize", cores]
    print(f"ratio prepare decode+crop+resize (all cores) / (floor x {cores}) = {ours / ideal:.2f} (target >= 0.8); "
          f"per file with hashes {rate['prepare per file: + 3 hashes', cores] / ideal:.2f}; "
          f"decode+crop+resize / PIL floor, both on all cores = "
          f"{ours / rate['PIL floor in a process pool (this machine)', cores]:.2f}")


if __name__ == "__main__":
    main()
