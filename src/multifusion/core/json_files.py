"""The one way the project writes a JSON file (metrics, reports, configs, records):
indented by 2, a final newline, parent folders created.

    write_json("metrics/eval.json", {"top1": 0.91})

A leaf module (standard library only): data/, llm/, text/ and the stages import it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` to ``path`` as ``json.dumps(obj, indent=2)`` plus a newline; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path
