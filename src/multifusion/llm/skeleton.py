"""``multifusion describe --init PATH``: a curated-YAML skeleton for one's own classes.

    result = write_skeleton("prompts/curated/mine.yaml", ["Spheres", "Rods"], cfg.llm, "prompts")

The file has the layout :mod:`multifusion.llm.curated` reads: ``version`` (that of the
curated files already in ``prompts/curated/``, so they merge), then per class one empty
list per template in ``llm.templates``, to fill in by hand. With ``descriptions`` (a
``data/descriptions.parquet`` from an LLM run) the lists hold that run's texts instead,
for a person to review and commit. An all-empty class stays on the label fallback, so a
half-written skeleton never breaks a run. Classes already curated elsewhere are left
out (a class may be listed in one file only).
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from multifusion.core.atomic import write_text
from multifusion.core.config import LLMConfig
from multifusion.llm.curated import CURATED_DIR, CuratedMissingError, load_curated
from multifusion.llm.prompts import ClassInfo, load_classes_file

WRAP = 88  # text width of a folded block


class SkeletonError(ValueError):
    """The skeleton cannot be written; the message names the file and the fix."""


@dataclass
class SkeletonResult:
    path: Path
    written: list[str]        # classes in the file
    already_listed: list[str]  # classes left out: already in a file of prompts/curated/
    filled: int               # texts taken from ``descriptions``


def folder_classes(root: str | Path) -> list[str]:
    """Class names of a data folder, as ``prepare`` finds them (sorted, unique)."""
    from multifusion.data.layout import scan_folder

    names = sorted({class_name for _, class_name, _ in scan_folder(root).files})
    if not names:
        raise SkeletonError(f"{root}: no class folders with images found; expected <root>/<Class>/* or <root>/train/<Class>/*")
    return names


def _block(text: str, indent: str) -> list[str]:
    """One list entry as a folded YAML block (``- >-``), read back as the text with single spaces."""
    lines = textwrap.wrap(" ".join(text.split()), WRAP - len(indent)) or [""]
    return [f"{indent}- >-", *(f"{indent}  {line}" for line in lines)]


def skeleton_yaml(infos: list[ClassInfo], templates: list[str], version: str, texts: dict[str, dict[str, list[str]]]) -> str:
    """The file's text: header, version, and per class a list per template (``[]`` when no text)."""
    out = [
        "# Curated descriptions of your classes (written by `multifusion describe --init`).",
        "# Fill in each empty list with at least one text per template (sample i of a request is",
        "# the i-th text), or review texts taken from an LLM run. A class whose lists are all empty",
        "# keeps the label fallback (provider=label). See prompts/curated/nffa.yaml for examples.",
        f"version: {version}",
        "classes:",
    ]
    for info in infos:
        note = f"label: {info.label}" + (f"; hint: {info.hint}" if info.hint else "")
        out.append(f"  {json.dumps(info.name)}:  # {' '.join(note.split())}")
        for template in templates:
            samples = texts.get(info.name, {}).get(template, [])
            if not samples:
                out.append(f"    {template}: []")
                continue
            out.append(f"    {template}:")
            for text in samples:
                out.extend(_block(text, "      "))
    return "\n".join(out) + "\n"


def texts_from_descriptions(path: str | Path) -> dict[str, dict[str, list[str]]]:
    """class -> template -> descriptions in sample order, from a descriptions table (label rows skipped)."""
    frame = pd.read_parquet(path)
    frame = frame[frame["provider"] != "label"].sort_values(["class_name", "template", "sample"])
    texts: dict[str, dict[str, list[str]]] = {}
    for row in frame.itertuples():
        texts.setdefault(str(row.class_name), {}).setdefault(str(row.template), []).append(str(row.description))
    return texts


def _existing(prompts_dir: str | Path, llm: LLMConfig):
    directory = Path(prompts_dir) / CURATED_DIR
    if not any(directory.glob("*.yaml")):
        return llm.model, {}
    curated = load_curated(prompts_dir)
    return curated.version, curated.texts


def write_skeleton(
    path: str | Path, class_names: list[str], llm: LLMConfig, prompts_dir: str | Path, descriptions: str | Path | None = None
) -> SkeletonResult:
    """Write the skeleton for ``class_names`` to ``path`` (never over an existing file)."""
    path = Path(path)
    if path.exists():
        raise SkeletonError(f"{path}: already exists; edit it, or pass another path to --init")
    try:
        version, curated = _existing(prompts_dir, llm)
    except CuratedMissingError as exc:
        raise SkeletonError(str(exc)) from exc
    done = [c for c in class_names if c in curated]
    todo = [c for c in class_names if c not in done]
    if not todo:
        raise SkeletonError(f"every class is already listed in {Path(prompts_dir) / CURATED_DIR}/*.yaml; edit those files")
    texts = texts_from_descriptions(descriptions) if descriptions is not None else {}
    infos = load_classes_file(llm.classes_file, todo)
    write_text(path, skeleton_yaml(infos, llm.templates, version, texts))
    filled = sum(len(texts.get(c, {}).get(t, [])) for c in todo for t in llm.templates)
    return SkeletonResult(path=path, written=todo, already_listed=done, filled=filled)
