"""A trained model as a directory a user loads (``models/hnf/``, ``models/compare/<name>/``):

    model.safetensors   the state dict (text features included: they are model buffers)
    config.json         {"model_name", "architecture", "config" (the full params mapping),
                         "classes", "text" (shape + index of the descriptions), "temperature",
                         "calibration" (optional)}

``load_model`` rebuilds the module from config.json (``multifusion.model.build_model`` for
MultiFusion, ``multifusion.model.baselines.build_baseline`` for a comparison baseline) and
loads the weights strictly, so a mismatch between code and weights is an error, not a
silently half-loaded model.

Stored params are read tolerantly in one direction. A model saved before params.yaml
gained a key lacks it: the key takes its value from the current params.yaml (the one of
the source tree this package runs from, else ./params.yaml), and a FilledParamsWarning
names every key filled and its value. If the model was trained under another value, the
strict weight load fails and its error names the filled keys. A stored key this version
does not know (removed since, or written by a newer version) is an error naming it: its
value may have mattered, so it is never dropped silently.

The training checkpoint a killed run resumes from lives in ``multifusion.training.train_state``.
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

import torch
import torch.nn as nn
import yaml
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from multifusion.core.errors import UserError, one_line
from multifusion.core.config import Config, ConfigError, config_from_dict
from multifusion.core.json_files import write_json
from multifusion.text.features import TextFeatures

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
BASELINES_MODULE = "multifusion.model.baselines"
RECORD_KEYS = ("model_name", "architecture", "config", "classes", "text", "temperature")
REDO = "copy the whole model directory again, or retrain it (`dvc repro train`)"
PACKAGE_PARAMS = Path(__file__).resolve().parents[3] / "params.yaml"  # the source tree's params.yaml


class ModelDirError(UserError, ValueError):
    """A model directory that cannot be loaded; the message names the file, the problem and the fix."""


class FilledParamsWarning(UserWarning):
    """A saved model's params lacked keys added to params.yaml since; they took the current values."""


@dataclass
class LoadedModel:
    model: nn.Module            # in eval mode, on the requested device
    cfg: Config
    classes: list[str]
    temperature: float
    model_name: str
    calibration: dict[str, Any] | None = None  # how the temperature was chosen (None: not recorded)


def architecture_of(model: nn.Module) -> str:
    """"baseline" for a module defined under multifusion.model.baselines, else "hnf"."""
    return "baseline" if type(model).__module__.startswith(BASELINES_MODULE) else "hnf"


def text_record(text: TextFeatures | None) -> dict[str, Any] | None:
    """What config.json keeps of the text features: their shape and index (the values are weights)."""
    if text is None:
        return None
    T, L, D = text.token_states.shape
    return {
        "shape": [T, L, D],
        "class_names": list(text.class_names),
        "templates": list(text.templates),
        "samples": [int(s) for s in text.samples],
    }


def placeholder_text(record: dict[str, Any] | None) -> TextFeatures | None:
    """Text features of the stored shape (zeros): the real values come from the state dict."""
    if record is None:
        return None
    T, L, D = record["shape"]
    return TextFeatures(
        token_states=torch.zeros(T, L, D),
        attention_mask=torch.ones(T, L, dtype=torch.bool),
        class_names=list(record["class_names"]),
        templates=list(record["templates"]),
        samples=list(record["samples"]),
    )


def save_model(
    out_dir: str | Path,
    model: nn.Module,
    cfg: Config,
    classes: list[str],
    text: TextFeatures | None,
    temperature: float,
    model_name: str,
    calibration: dict[str, Any] | None = None,
) -> None:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json`` (with ``calibration``,
    e.g. ``TemperatureFit.to_dict()``, when given)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    st_save_model(model, str(out_dir / WEIGHTS))
    record = {
        "model_name": model_name,
        "architecture": architecture_of(model),
        "config": cfg.to_dict(),
        "classes": list(classes),
        "text": text_record(text),
        "temperature": float(temperature),
    }
    if calibration is not None:
        record["calibration"] = calibration
    write_json(out_dir / CONFIG, record)


def build_from_record(record: dict[str, Any], cfg: Config) -> nn.Module:
    """The untrained module that ``record`` (a config.json) describes, under ``cfg``."""
    if record["architecture"] == "baseline":
        from multifusion.model.baselines import build_baseline

        return build_baseline(record["model_name"], len(record["classes"]), cfg.data.image_size)
    from multifusion.model import build_model

    return build_model(cfg, record["classes"], placeholder_text(record["text"]))


def read_record(path: Path) -> dict[str, Any]:
    """A model's config.json, checked for every entry :func:`load_model` reads."""
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelDirError(f"{path}: damaged, not valid JSON ({one_line(err)}); {REDO}") from None
    missing = [k for k in RECORD_KEYS if k not in record] if isinstance(record, dict) else list(RECORD_KEYS)
    if missing:
        raise ModelDirError(f"{path}: no {', '.join(repr(k) for k in missing)} entry; not a model written by "
                            f"multifusion's save_model; {REDO}")
    classes, temperature = record["classes"], record["temperature"]
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise ModelDirError(f"{path}: 'classes' must list at least 2 class names, got {classes!r}; {REDO}")
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ModelDirError(f"{path}: 'temperature' must be a positive number, got {temperature!r}; {REDO}")
    return record


# ---------------------------------------------------------------------------------------
# Stored params: keys added to params.yaml since the model was saved take the current values


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
        if name not in stored and name in defaults:
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
    found = _Completion()
    params = _complete(stored, {}, Config, "", found)  # no defaults yet: what is unknown, what is lacking
    if found.unknown:
        raise ModelDirError(f"{path}: its params hold keys this version of multifusion does not know "
                            f"({', '.join(found.unknown)}); load it with the version that saved it, delete those keys from "
                            "config.json if they no longer matter, or retrain it (`dvc repro train`)")
    if not found.lacking:
        return params, {}
    source = defaults_file()
    if source is not None:
        with source.open() as f:
            found = _Completion()
            params = _complete(stored, yaml.safe_load(f) or {}, Config, "", found)
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


def _config(params: dict[str, Any], path: Path, filled: dict[str, Any]) -> Config:
    try:
        return config_from_dict(params)
    except ConfigError as err:
        reason = str(err).removeprefix("params.yaml: ").split(";")[0]
        raise ModelDirError(f"{path}: its params do not fit this version of multifusion ({reason}); "
                            f"{_fix(filled, 'retrain with it (`dvc repro train`)')}") from None


def model_config(record: dict[str, Any], path: Path) -> Config:
    """The params a model was trained with (``record``: its config.json at ``path``), keys
    added to params.yaml since filled with the current values."""
    params, filled = completed_params(record, path)
    return _config(params, path, filled)


# ---------------------------------------------------------------------------------------
# Loading


def _rebuild(record: dict[str, Any], cfg: Config, path: Path) -> nn.Module:
    """The (untrained) module that config.json describes."""
    try:
        return build_from_record(record, cfg)
    except (ValueError, KeyError, TypeError, IndexError) as err:
        reason = one_line(err).split(";")[0]  # the fact, without advice meant for params.yaml
        raise ModelDirError(f"{path}: the model cannot be rebuilt from it ({reason}); {REDO}") from None


def _load_weights(model: nn.Module, weights: Path, config: Path, filled: dict[str, Any]) -> None:
    """Strictly load ``weights`` into ``model``; a damaged file or a mismatch names the fix."""
    try:
        st_load_model(model, str(weights), strict=True, device="cpu")
    except RuntimeError as err:  # strict loading: missing, unexpected or mis-shaped tensors
        details = [line.strip() for line in str(err).splitlines()[1:] if line.strip()] or [one_line(err)]
        more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
        fix = _fix(filled, f"the two files come from different models: {REDO}")
        raise ModelDirError(f"{weights}: does not match {config.name}: {details[0]}{more}; {fix}") from None
    except Exception as err:  # noqa: BLE001 -- SafetensorError, OSError: a truncated or foreign file
        raise ModelDirError(f"{weights}: damaged or truncated ({one_line(err)}); {REDO}") from None


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a saved model from ``model_dir`` (config.json + model.safetensors), eval mode.
    A missing file raises FileNotFoundError, a damaged or mismatched one ModelDirError."""
    model_dir = Path(model_dir)
    for name in (CONFIG, WEIGHTS):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name}: missing; pass the directory of a trained model "
                                    "(config.json + model.safetensors), or train one (`dvc repro train`)")
    record = read_record(model_dir / CONFIG)
    params, filled = completed_params(record, model_dir / CONFIG)
    cfg = _config(params, model_dir / CONFIG, filled)
    model = _rebuild(record, cfg, model_dir / CONFIG)
    _load_weights(model, model_dir / WEIGHTS, model_dir / CONFIG, filled)
    model.to(device).eval()
    return LoadedModel(
        model=model,
        cfg=cfg,
        classes=list(record["classes"]),
        temperature=float(record["temperature"]),
        model_name=str(record["model_name"]),
        calibration=record.get("calibration"),
    )
