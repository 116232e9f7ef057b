"""DVC stage `prepare`: a folder of labelled micrographs -> data/prepared (images.npy,
manifest.parquet, classes.json, report.json). Bad files are skipped and reported."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from multifusion.core.errors import run_stage
from multifusion.core.config import load_config
from multifusion.data.prepare import PrepareError, prepare_dataset
from multifusion.core.timings import write_timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True, help="<root>/<Class>/* or <root>/{train,val,test}/<Class>/*")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    cfg = load_config(args.params)
    start = time.perf_counter()
    try:
        report = prepare_dataset(args.root, args.out, cfg.data, cfg.seed)
    except PrepareError as err:
        sys.exit(f"prepare: error: {err}")
    seconds = time.perf_counter() - start
    write_timing("prepare", seconds)  # not in report.json: data/prepared holds only what its inputs determine
    print(f"kept {report['kept']} of {report['scanned']} files ({len(report['skipped'])} skipped, "
          f"{len(report['duplicates'])} duplicates), {len(report['classes'])} classes, "
          f"{report['near_duplicate_groups']} near-duplicate groups, {seconds:.2f} s")
    for split, counts in report["splits"].items():
        print(f"  {split:5s} {sum(counts.values()):6d}")


if __name__ == "__main__":
    run_stage("prepare", main)
