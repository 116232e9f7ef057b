"""DVC stage `synthesize`: write the synthetic SEM-10 micrographs to --out."""

from __future__ import annotations

import argparse
import time

from multifusion.core.errors import run_stage
from multifusion.core.config import load_config
from multifusion.data.synthesize import generate_dataset
from multifusion.core.timings import write_timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="output folder, one sub-folder per class")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    cfg = load_config(args.params)
    start = time.perf_counter()
    counts = generate_dataset(cfg.synthesize, cfg.seed, args.out, workers=cfg.data.workers)
    for name, n in counts.items():
        print(f"{name:30s} {n:5d}")
    seconds = time.perf_counter() - start
    write_timing("synthesize", seconds)
    print(f"{sum(counts.values())} images in {seconds:.1f} s -> {args.out}")


if __name__ == "__main__":
    run_stage("synthesize", main)
