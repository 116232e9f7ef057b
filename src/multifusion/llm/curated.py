"""The ``curated`` provider: descriptions written by the team, shipped in ``prompts/curated/``.

Offline and deterministic, the default of the embedded pipeline. Each file is

    version: curated-v1          # recorded as the model of every row
    classes:
      <folder name>:
        <template>: [text of sample 0, text of sample 1, ...]

Sample ``i`` of a class x template is the i-th text. A class with no text at all (absent,
or every list empty as in a ``multifusion describe --init`` skeleton) is left to the
label fallback (:mod:`multifusion.llm.label`); in a partly curated class a missing text
is never filled in: :func:`curated_answers` names every gap and how to fill it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from multifusion.core.config import read_yaml
from multifusion.llm.requests import LLMRequest

CURATED_DIR = "curated"


class CuratedMissingError(ValueError):
    """Some requested class x template x sample has no curated text."""


@dataclass(frozen=True)
class CuratedTexts:
    version: str
    texts: dict[str, dict[str, list[str]]]  # class -> template -> samples
    files: list[Path]


def load_curated(prompts_dir: str | Path) -> CuratedTexts:
    """Read and merge every ``prompts/curated/*.yaml``; all must share one version."""
    directory = Path(prompts_dir) / CURATED_DIR
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise CuratedMissingError(f"{directory}: no curated description files (*.yaml); restore them or set llm.provider=openai")
    versions: set[str] = set()
    texts: dict[str, dict[str, list[str]]] = {}
    for path in files:
        raw = read_yaml(path, CuratedMissingError) or {}
        if not isinstance(raw, dict) or not isinstance(raw.get("version"), str) or not isinstance(raw.get("classes"), dict):
            raise CuratedMissingError(f"{path}: expected keys 'version' (string) and 'classes' (mapping); see the file header")
        versions.add(raw["version"])
        for class_name, by_template in raw["classes"].items():
            class_name = str(class_name)
            if class_name in texts:
                raise CuratedMissingError(f"{path}: class '{class_name}' is also curated in another file; keep one")
            if not isinstance(by_template, dict) or not all(
                isinstance(v, list) and all(isinstance(t, str) and t.strip() for t in v) for v in by_template.values()
            ):
                raise CuratedMissingError(f"{path}: class '{class_name}' must map template names to lists of non-empty texts")
            texts[class_name] = {str(t): [s.strip() for s in v] for t, v in by_template.items()}
    if len(versions) != 1:
        raise CuratedMissingError(f"{directory}: files disagree on 'version' {sorted(versions)}; use one version for all")
    return CuratedTexts(version=versions.pop(), texts=texts, files=files)


def uncurated_classes(class_names: list[str], curated: CuratedTexts) -> list[str]:
    """The classes of ``class_names`` without a single curated text, in the given order."""
    return [c for c in class_names if not any(curated.texts.get(c, {}).values())]


def missing_requests(requests: list[LLMRequest], curated: CuratedTexts) -> list[LLMRequest]:
    return [
        r for r in requests if len(curated.texts.get(r.class_name, {}).get(r.template, [])) <= r.sample
    ]


def curated_answers(requests: list[LLMRequest], curated: CuratedTexts, prompts_dir: str | Path) -> dict[str, str]:
    """The curated text for every request, by key; raises when any is missing."""
    missing = missing_requests(requests, curated)
    if missing:
        classes = sorted({r.class_name for r in missing})
        what = sorted({f"{r.class_name}/{r.template}/sample {r.sample}" for r in missing})
        shown = ", ".join(what[:8]) + (f" and {len(what) - 8} more" if len(what) > 8 else "")
        raise CuratedMissingError(
            f"no curated description for {len(classes)} class(es): {', '.join(classes)} ({shown}). "
            f"Add texts under 'classes:' in a file {Path(prompts_dir) / CURATED_DIR}/<dataset>.yaml "
            f"(one list per template, one text per sample), or set llm.provider=openai and llm.model "
            f"to have a model write them"
        )
    return {r.key: curated.texts[r.class_name][r.template][r.sample] for r in requests}
