"""Checks on the files a command will write, made before any work: an output never
overwrites an input, and a path that cannot be written fails at once, not after inference.

    check_outputs({"--out": ("predictions.csv", CSV_RULE), "--contact-sheet": ("sheet.png", FIGURE_RULE)},
                  inputs=[Path("shots/a.tif")])
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from multifusion.core.errors import UserError
from multifusion.data.layout import IMAGE_EXTENSIONS


class OutputPathError(UserError, ValueError):
    """An output path that would destroy an input or cannot be written; names the flag and the fix."""


@dataclass(frozen=True)
class OutputRule:
    example: str                          # a good name, offered in the messages
    refuse: tuple[str, ...] = ()          # extensions this output must not have
    require: tuple[str, ...] = ()         # extensions it must have (empty: any)


CSV_RULE = OutputRule("predictions.csv", refuse=IMAGE_EXTENSIONS)
FIGURE_RULE = OutputRule("contact_sheet.png", require=(".png", ".jpg", ".jpeg", ".pdf", ".svg"))
HTML_RULE = OutputRule("report.html", require=(".html", ".htm"))


def _writable_folder(path: Path) -> str | None:
    """Why the folder that will hold ``path`` cannot be made or written, or None."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, so no folder can be made there"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"no permission to write in {parent}"
    return None


def check_output(flag: str, path: str | Path, rule: OutputRule, inputs: set[Path]) -> None:
    """Raise OutputPathError when ``path`` (given as ``flag``) is an input, a folder, has a
    refused (or lacks a required) extension, or lies where nothing can be written."""
    text, path = str(path), Path(path)
    suffix = path.suffix.lower()
    if text.endswith(("/", os.sep)) or path.is_dir():
        problem = f"is a folder; give a file name, e.g. {path / rule.example}"
    elif path.resolve() in inputs:
        problem = "is one of the inputs: writing it would overwrite that file; choose another name"
    elif suffix in rule.refuse:
        problem = f"has an image extension ({suffix}): it would replace an image with text; name it e.g. {rule.example}"
    elif rule.require and suffix not in rule.require:
        problem = f"needs one of the extensions {', '.join(rule.require)}; name it e.g. {rule.example}"
    elif reason := _writable_folder(path.resolve()):
        problem = f"cannot be written: {reason}"
    else:
        return
    raise OutputPathError(f"{flag} {text}: {problem}")


def check_outputs(outputs: dict[str, tuple[str | Path | None, OutputRule]], inputs: Iterable[Path]) -> None:
    """:func:`check_output` for every output given (None: not asked for); two outputs may
    not share a path either."""
    resolved = {Path(p).resolve() for p in inputs}
    seen: dict[Path, str] = {}
    for flag, (path, rule) in outputs.items():
        if path is None:
            continue
        check_output(flag, path, rule, resolved)
        target = Path(path).resolve()
        if target in seen:
            raise OutputPathError(f"{flag} {path}: the same file as {seen[target]}; give each output its own name")
        seen[target] = flag
