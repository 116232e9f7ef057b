"""The one way the project writes a JSON file (metrics, reports, configs, records):
indented by 2, a final newline, parent folders created, written atomically
(:mod:`multifusion.core.atomic`: a failed write leaves the previous file as it was).

    write_json("metrics/eval.json", {"top1": 0.91})

A leaf module (standard library and core.atomic): data/, llm/, text/ and the stages import it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from multifusion.core.atomic import write_text


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` to ``path`` as ``json.dumps(obj, indent=2)`` plus a newline; returns the path."""
    text = json.dumps(obj, indent=2) + "\n"  # serialised first: an object that does not serialise writes nothing
    return write_text(path, text)
