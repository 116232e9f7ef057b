"""The one guard on the files a command will write, run before any work: an output never
lands on an input, inside a folder being read or inside the model folder, and a path that
cannot be written fails at once, named by its flag, not after inference.

    check_outputs({"--out": ("predictions.csv", CSV_RULE), "--contact-sheet": ("sheet.png", FIGURE_RULE)},
                  inputs=[Path("shots/a.tif")], folders=[Path("shots")], model="models/hnf")

Used by every command that writes: ``multifusion predict`` (--out, --contact-sheet,
--report), ``multifusion explain`` (--out, a folder), ``multifusion describe --init`` and the
comparison report stage (--out, a folder). Paths are compared after ``os.path.realpath``
(symbolic links and ``..`` resolved; a link loop is compared as spelled, never an error).
"""

from __future__ import annotations

import errno
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
    folder: bool = False                  # the output is a folder the command writes files into


CSV_RULE = OutputRule("predictions.csv", refuse=IMAGE_EXTENSIONS)
FIGURE_RULE = OutputRule("contact_sheet.png", require=(".png", ".jpg", ".jpeg", ".pdf", ".svg"))
HTML_RULE = OutputRule("report.html", require=(".html", ".htm"))
YAML_RULE = OutputRule("prompts/curated/mine.yaml", require=(".yaml",))  # curated files are read as *.yaml
TABLE_RULE = OutputRule("descriptions.parquet", refuse=IMAGE_EXTENSIONS)
JSON_RULE = OutputRule("metrics.json", refuse=IMAGE_EXTENSIONS)
FOLDER_RULE = OutputRule("figures", folder=True)


def real(path: str | Path) -> Path:
    """``path`` absolute, with links and ``..`` resolved; never raises (a loop stays as spelled)."""
    return Path(os.path.realpath(path))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def _nearest_existing(path: Path) -> Path:
    parent = path.parent
    while not os.path.lexists(parent):
        parent = parent.parent
    return parent


def _file_in_the_way(path: Path) -> str | None:
    parent = _nearest_existing(path)
    return None if parent.is_dir() else f"{parent} is a file, so no folder can be made there"


def _cannot_write(path: Path) -> str | None:
    """Why no file can be made at ``path`` (folders included), or None: a probe file is
    created and removed in the nearest existing folder (a permission bit says nothing about
    /proc, a read-only mount or a root user)."""
    if reason := _file_in_the_way(path):
        return reason
    parent = _nearest_existing(path)
    probe = parent / f".{path.name}.{os.getpid()}.probe"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as err:
        if err.errno == errno.EEXIST:
            return None
        return f"no file can be created in {parent} ({err.strerror or err}); choose a writable folder"
    os.close(fd)
    os.unlink(probe)
    return None


def _problem(text: str, path: Path, rule: OutputRule, inputs: set[Path], folders: list[Path], model: Path | None) -> str | None:
    target = real(path)
    held = sorted(p for p in inputs if p.parent == target) if rule.folder else []
    around = next((f for f in folders if _inside(target, f)), None)
    if target in inputs:
        return "is one of the inputs: writing it would overwrite that file; choose another name"
    if model is not None and _inside(target, model):
        return (f"lies inside the model folder {model} (--model): writing there would change the model; "
                "choose a path outside it")
    if not rule.folder and (text.endswith(("/", os.sep)) or path.is_dir()):
        return f"is a folder; give a file name, e.g. {path / rule.example}"
    if not rule.folder and (blocked := _file_in_the_way(target)):
        return f"cannot be written: {blocked}"
    if around is not None:
        what = "is" if target == around else "lies inside"
        return (f"{what} the input folder {around}, which is being read: its files would be taken as inputs "
                f"or overwritten; choose a path outside it")
    if rule.folder:
        if path.exists() and not path.is_dir():
            return f"is a file, not a folder; give a folder for the files, e.g. {rule.example}/"
        if held:
            return (f"holds the input {held[0]}: the files written there could overwrite it; "
                    f"choose another folder, e.g. {rule.example}/")
        reason = _cannot_write(target / rule.example)
        return None if reason is None else f"cannot be written: {reason}"
    suffix = path.suffix.lower()
    if suffix in rule.refuse:
        return f"has an image extension ({suffix}): it would replace an image with text; name it e.g. {rule.example}"
    if rule.require and suffix not in rule.require:
        return f"needs one of the extensions {', '.join(rule.require)}; name it e.g. {rule.example}"
    reason = _cannot_write(target)
    return None if reason is None else f"cannot be written: {reason}"


def check_output(flag: str, path: str | Path, rule: OutputRule, inputs: set[Path],
                 folders: Iterable[Path] = (), model: Path | None = None) -> None:
    """Raise OutputPathError when ``path`` (given as ``flag``) is an input, lies inside an
    input folder or the model folder, is a folder (a file for a folder rule), has a refused
    (or lacks a required) extension, or lies where nothing can be written. ``inputs``,
    ``folders`` and ``model`` are already resolved (:func:`real`)."""
    problem = _problem(str(path), Path(path), rule, inputs, list(folders), model)
    if problem is not None:
        raise OutputPathError(f"{flag} {path}: {problem}")


def check_outputs(outputs: dict[str, tuple[str | Path | None, OutputRule]], inputs: Iterable[Path],
                  folders: Iterable[Path] = (), model: str | Path | None = None) -> None:
    """:func:`check_output` for every output given (None: not asked for); two outputs may
    not share a path either. ``inputs``: the files to be read; ``folders``: the folders
    walked for them; ``model``: the model folder (--model)."""
    resolved = {real(p) for p in inputs}
    walked = [real(f) for f in folders]
    model_dir = None if model is None else real(model)
    seen: dict[Path, str] = {}
    for flag, (path, rule) in outputs.items():
        if path is None:
            continue
        check_output(flag, path, rule, resolved, walked, model_dir)
        target = real(path)
        if target in seen:
            raise OutputPathError(f"{flag} {path}: the same file as {seen[target]}; give each output its own name")
        seen[target] = flag
