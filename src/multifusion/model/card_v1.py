"""Model directories of format 1 (config.json holding the whole params file, before the
model card): their stored params are read and turned into a card of format 2.

Stored params are read tolerantly in one direction. A model saved before params.yaml
gained a key lacks it: the key takes its value from the current params.yaml (the one of
the source tree this package runs from, else ./params.yaml), and a FilledParamsWarning
names every key filled and its value. If the model was trained under another value, the
strict weight load fails and its error names the filled keys. A stored key this version
does not know (removed since, or written by a newer version) is an error naming it: its
value may have mattered, so it is never dropped silently.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multifusion.core.config import (ConfigError, read_yaml, DataConfig, EvaluateConfig, FusionConfig, GraphConfig, HNFConfig,
                                     section_from_dict)
from multifusion.core.errors import UserError

CONFIG = "config.json"
REDO = "copy the whole model directory again, or retrain it (`dvc repro train`)"
CARD_SECTIONS = ("data", "evaluate", "hnf", "graph", "fusion")
PACKAGE_PARAMS = Path(__file__).resolve().parents[3] / "params.yaml"  # the source tree's params.yaml


class ModelDirError(UserError, ValueError):
    """A model directory that cannot be loaded; the message names the file, the problem and the fix."""


class FilledParamsWarning(UserWarning):
    """A format-1 model's params lacked keys added to params.yaml since; they took the current values."""


# Keys added after format 1 whose value every format-1 model had by construction (a model
# saved before data.unlabeled existed was pretrained on no unlabelled folder, and one saved
# before data.grey_levels saw raw grey levels): set, not filled.
NEWER_THAN_FORMAT_1: dict[str, Any] = {"data.unlabeled": None, "data.grey_levels": "raw"}


@dataclass(frozen=True)
class CardParams:
    """The sections of a format-1 model's params that its card keeps; the others (train,
    compare, predict, ...) are ignored, so a key removed from them never blocks a load."""

    data: DataConfig
    evaluate: EvaluateConfig
    hnf: HNFConfig
    graph: GraphConfig
    fusion: FusionConfig


@dataclass
class _Completion:
    """What completing stored params found: keys filled from params.yaml (with their values),
    keys neither stored nor in params.yaml, keys this version does not know."""

    filled: dict[str, Any] = dataclasses.field(default_factory=dict)
    lacking: list[str] = dataclasses.field(default_factory=list)
    unknown: list[str] = dataclasses.field(default_factory=list)


def _complete(stored: dict[str, Any], defaults: dict[str, Any], section: type, prefix: str, found: _Completion) -> dict[str, Any]:
    """``stored`` with every key of the Config ``section`` it lacks copied from ``defaults``."""
    hints = typing.get_type_hints(section)
    found.unknown += [prefix + key for key in stored if key not in hints]
    out = dict(stored)
    for field in dataclasses.fields(section):
        name, key, hint = field.name, prefix + field.name, hints[field.name]
        if name not in stored and key in NEWER_THAN_FORMAT_1:  # what the model had then: nothing to fill, nothing to warn of
            out[name] = copy.deepcopy(NEWER_THAN_FORMAT_1[key])
        elif name not in stored and name in defaults:
            out[name] = found.filled[key] = copy.deepcopy(defaults[name])
        elif name not in stored:
            found.lacking.append(key)
        elif dataclasses.is_dataclass(hint) and isinstance(stored[name], dict):
            sub = defaults.get(name) if isinstance(defaults.get(name), dict) else {}
            out[name] = _complete(stored[name], sub, hint, key + ".", found)
    return out


def defaults_file() -> Path | None:
    """The params.yaml that fills keys a stored config lacks: the source tree's, else ./params.yaml."""
    return next((path for path in (PACKAGE_PARAMS, Path("params.yaml")) if path.is_file()), None)


def completed_params(record: dict[str, Any], path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the stored params with the keys added since filled in, {filled key: value}); warns
    (FilledParamsWarning) when it fills any. ModelDirError on a key this version does not
    know, or one that neither the model nor params.yaml has."""
    stored = record["config"]
    if not isinstance(stored, dict):
        raise ModelDirError(f"{path}: 'config' must be the params mapping, got {type(stored).__name__}; {REDO}")
    stored = {name: stored[name] for name in CARD_SECTIONS if name in stored}
    found = _Completion()
    params = _complete(stored, {}, CardParams, "", found)  # no defaults yet: what is unknown, what is lacking
    if found.unknown:
        raise ModelDirError(f"{path}: its params hold keys this version of multifusion does not know "
                            f"({', '.join(found.unknown)}); load it with the version that saved it, delete those keys from "
                            "config.json if they no longer matter, or retrain it (`dvc repro train`)")
    if not found.lacking:
        return params, {}
    source = defaults_file()
    if source is not None:
        found = _Completion()
        params = _complete(stored, read_yaml(source, ModelDirError) or {}, CardParams, "", found)
    if found.lacking:
        raise ModelDirError(f"{path}: saved before params.yaml had {', '.join(found.lacking)}, and "
                            f"{source or 'no params.yaml here'} has no value for them; run from the project root "
                            "or add them to config.json")
    values = ", ".join(f"{key}={json.dumps(value)}" for key, value in found.filled.items())
    warnings.warn(f"{path}: saved before params.yaml had {', '.join(found.filled)}; using the current values from "
                  f"{source}: {values}", FilledParamsWarning, stacklevel=2)
    return params, found.filled


def _fix(filled: dict[str, Any], otherwise: str) -> str:
    """The advice of an error met after filling keys: the filled keys may be the cause."""
    if not filled:
        return otherwise
    them = "it" if len(filled) == 1 else "them"
    return f"{', '.join(filled)} came from params.yaml: set {them} in {CONFIG} to the values the model was trained with"


def _config(params: dict[str, Any], path: Path, filled: dict[str, Any]) -> CardParams:
    try:
        return section_from_dict(CardParams, params, "")
    except ConfigError as err:
        reason = str(err).removeprefix("params.yaml: ").split(";")[0]
        raise ModelDirError(f"{path}: its params do not fit this version of multifusion ({reason}); "
                            f"{_fix(filled, 'retrain with it (`dvc repro train`)')}") from None


def legacy_config(record: dict[str, Any], path: Path) -> tuple[CardParams, dict[str, Any]]:
    """(the sections of params a format-1 model was trained with that its card keeps,
    {key filled from params.yaml: value})."""
    params, filled = completed_params(record, path)
    return _config(params, path, filled), filled
