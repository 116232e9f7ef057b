"""DVC stages `validate` and `validate_data`: refuse bad params or a bad data root before
DVC removes any output.

DVC deletes a stage's outputs before it runs the stage, so a value refused inside
`prepare` or `train` would cost their previous outputs. These stages run first and write
only a small marker that every other stage depends on: when they fail, DVC stops before
any other stage starts.

    python stages/validate.py params --root data/raw/synthetic --out data/validated/params.json
    python stages/validate.py data --root data/raw/synthetic --out data/validated/data.json

`params` checks all of params.yaml (through the one Config loader: unknown and missing
keys, types, ranges, cross-key rules), the synthesize counts, the YAML of the class and
curated-description files, and the layout of data.root when it exists already (the
synthetic default is written by `synthesize` after this stage: `data` checks it then). `data`
checks the layout of data.root (a folder, no ambiguous split folders, image files of at
least two classes, every val/test class in train/): the checks `prepare` makes before
it writes anything. The messages are the stages' own one-line messages.

Outputs hold only what the checks found, never the params' values: a change of any param
re-runs `validate`, but the other stages re-run only for the params they use.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from multifusion.core.config import Config, ConfigError, load_config, read_yaml
from multifusion.core.errors import run_stage
from multifusion.core.json_files import write_json
from multifusion.data.layout import check_data_root

CURATED_DIR = "curated"  # = multifusion.llm.curated.CURATED_DIR (importing multifusion.llm loads the openai client: 1.4 s)

MARKER = {"params": "valid", "checked": ["params.yaml", "synthesize counts", "classes file", "curated descriptions"]}


def check_prompt_files(cfg: Config, prompts: Path) -> None:
    """The YAML files describe reads parse (one line with file, line and column if not)."""
    classes_file = Path(cfg.llm.classes_file)
    if classes_file.is_file():
        read_yaml(classes_file, ConfigError)
    for path in sorted((prompts / CURATED_DIR).glob("*.yaml")):
        read_yaml(path, ConfigError)


def check_synthesize(cfg: Config) -> None:
    """The synthesize stage's own count check (it needs the number of synthetic classes)."""
    from multifusion.data.synthesize import class_counts

    class_counts(cfg.synthesize.total, cfg.synthesize.min_per_class)


def validate_params(params: Path, root: str, prompts: Path, out: Path) -> None:
    cfg = load_config(params)
    check_synthesize(cfg)
    check_prompt_files(cfg, prompts)
    if Path(root).exists():  # not yet: the synthetic default before `synthesize`; `validate_data` checks it then
        check_data_root(root)
    write_json(out, MARKER)
    print(f"validate: {params} is valid")


def validate_data(root: str, out: Path) -> None:
    summary = check_data_root(root)
    write_json(out, summary)
    print(f"validate_data: {root}: {len(summary['classes'])} classes"
          f"{', given train/val/test split' if summary['split_layout'] else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("params", "data"), help="params: params.yaml and prompts; data: the data root's layout")
    parser.add_argument("--root", required=True, help="data.root")
    parser.add_argument("--out", type=Path, required=True, help="the marker file written when every check passes")
    parser.add_argument("--prompts", type=Path, default=Path("prompts"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    if args.what == "params":
        validate_params(args.params, args.root, args.prompts, args.out)
    else:
        validate_data(args.root, args.out)


if __name__ == "__main__":
    run_stage("validate", main)
