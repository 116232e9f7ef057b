"""Benchmark: prepare's decode + info-bar crop + square + resize, on all cores, against
the floor of the work -- a plain PIL open + grey + resize loop on one core -- over the
same 1024x768 8-bit TIFFs (like the NFFA originals), in the same run.

    python bench/prepare.py [--images 200] [--size 64]

Target: prepare on all cores >= 0.8 x (floor x cores).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from multifusion.config import load_config
from multifusion.data.ingest import prepare_files
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


def floor_loop(paths: list[str], size: int) -> float:
    """Plain PIL: open, grey, resize, to numpy; one core. Returns seconds."""
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            np.asarray(image.convert("L").resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    data_all = load_config(args.params, {"data.image_size": args.size, "data.workers": 0}).data
    data_one = load_config(args.params, {"data.image_size": args.size, "data.workers": 1}).data
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_tiffs(Path(tmp), args.images)
        floor_loop(paths, args.size)  # warm the page cache
        t_floor = floor_loop(paths, args.size)
        start = time.perf_counter()
        serial = list(prepare_files(paths, data_one, progress=False))
        t_serial = time.perf_counter() - start
        start = time.perf_counter()
        parallel = list(prepare_files(paths, data_all, progress=False))
        t_parallel = time.perf_counter() - start
    assert all(not r.error for r in serial + parallel) and all(r.bar_rows > 0 for r in parallel)
    n = args.images
    floor, ideal = n / t_floor, n * cores / t_floor
    rows = [
        ("PIL open+grey+resize (floor)", 1, floor, floor / ideal),
        ("floor x cores (ideal)", cores, ideal, 1.0),
        ("prepare decode+bar+square+resize+hash", 1, n / t_serial, n / t_serial / ideal),
        ("prepare decode+bar+square+resize+hash", cores, n / t_parallel, n / t_parallel / ideal),
    ]
    load = os.getloadavg()[0]
    print(f"{n} TIFFs 1024x768 8-bit -> {args.size}x{args.size}, {cores} cores, load average {load:.1f} "
          "(a load above the core count makes the all-core rows unreliable)")
    print(f"{'what':42s} {'cores':>5s} {'images/s':>9s} {'vs floor x cores':>17s}")
    for name, c, rate, ratio in rows:
        print(f"{name:42s} {c:5d} {rate:9.1f} {ratio:17.2f}")
    ratio = rows[-1][3]
    print(f"ratio prepare(all cores) / (floor x {cores}) = {ratio:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
