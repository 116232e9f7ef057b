"""Wall-clock timings of pipeline stages, kept out of everything DVC hashes.

A stage's outputs, and the metrics files recorded in dvc.lock (DVC hashes an out even
when it is ``cache: false``), hold only what the stage's inputs determine: the same inputs
give the same bytes, so a fresh clone's ``dvc repro`` leaves ``git status`` clean, and a
re-run whose output did not change re-runs nothing downstream. How long a run took is not
such a fact. Stages write it to ``metrics/timings/<stage>.json`` instead: git-ignored,
declared nowhere in dvc.yaml, overwritten by each run.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from multifusion.core.json_files import write_json

TIMINGS_DIR = Path("metrics/timings")  # relative to the repository root, where DVC runs every stage


def write_timing(stage: str, seconds: float, directory: str | Path = TIMINGS_DIR) -> Path:
    """Write ``{"stage", "seconds", "finished", "cpu_count"}`` to ``<directory>/<stage>.json``."""
    record = {
        "stage": stage,
        "seconds": round(seconds, 2),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
    }
    return write_json(Path(directory) / f"{stage}.json", record)
