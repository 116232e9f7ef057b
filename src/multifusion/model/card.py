"""A trained model as a directory a user loads (``models/hnf/``, ``models/compare/<name>/``):

    model.safetensors   the state dict (text features included: they are model buffers)
    config.json         the model card: what it takes to rebuild and use the model, nothing more

The card (format 2), like timm's ``pretrained_cfg``::

    {"format_version": 2,
     "model_name": "hnf",                                   # the run's name (a comparison row)
     "architecture": {"name": "multifusion", "args": {...}},  # create_model(name, K, S, **args)
     "classes": [...],                                      # label order
     "input": {"image_size", "aspect", "infobar", "grey_levels", "max_pixels", "tta"},  # the input policy
     "text": {"shape", "class_names", "templates", "samples"} | null,
     "temperature": 1.3, "calibration": {...},              # how the temperature was chosen
     "unknown": {...}}                                      # the unknown-material score, when fitted

Loading needs no params.yaml: a model directory copied anywhere loads and predicts with
the installed package. ``load_model`` checks the card against itself and the weights
(classes against the head's size and the descriptions' labels, the text record against
the stored text features) and loads the weights strictly; every mismatch is one line.
Directories of format 1 (config.json holding the whole params file) still load: their
params are converted (``multifusion.model.card_v1``).

The training checkpoint a killed run resumes from lives in ``multifusion.training.train_state``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from multifusion.core.atomic import atomic_path
from multifusion.core.config import Config
from multifusion.core.errors import one_line
from multifusion.core.json_files import write_json
from multifusion.model.card_v1 import CONFIG, REDO, FilledParamsWarning, ModelDirError, legacy_config
from multifusion.model.registry import create_model
from multifusion.text.features import TextFeatures

__all__ = ["CONFIG", "FORMAT_VERSION", "WEIGHTS", "FilledParamsWarning", "InputPolicy", "LoadedModel", "ModelDirError",
           "load_model", "placeholder_text", "read_card", "save_model", "text_record"]

WEIGHTS = "model.safetensors"
FORMAT_VERSION = 2
CARD_KEYS = ("format_version", "model_name", "architecture", "classes", "input", "text", "temperature")
# Input-policy entries added to format 2 since its first cards, with the value every earlier
# model had by construction (grey levels were fed raw before data.grey_levels existed).
INPUT_KEYS_ADDED: dict[str, Any] = {"grey_levels": "raw"}


@dataclass(frozen=True)
class InputPolicy:
    """How a micrograph becomes the model's input, and the test-time views.
    Duck-types the fields of ``DataConfig`` that decoding reads."""

    image_size: int         # side of the square grey image the model sees
    aspect: str             # crop | pad: how a non-square micrograph becomes square
    infobar: str            # auto | none: crop the burnt-in instrument bar
    grey_levels: str        # standardize | raw: each image's grey levels to one mean and spread, or as recorded
    max_pixels: int         # larger files are refused as decompression bombs
    tta: bool               # logits averaged over the 8 flips/rotations

    @classmethod
    def from_config(cls, cfg: Config) -> "InputPolicy":
        d = cfg.data
        return cls(d.image_size, d.aspect, d.infobar, d.grey_levels, d.max_pixels, cfg.evaluate.tta)


@dataclass
class LoadedModel:
    model: nn.Module            # in eval mode, on the requested device
    classes: list[str]
    temperature: float
    model_name: str
    input: InputPolicy
    architecture: dict[str, Any]
    calibration: dict[str, Any] | None = None  # how the temperature was chosen (None: not recorded)
    unknown: dict[str, Any] | None = None      # the unknown-material score's card entry (None: not fitted)


def text_record(text: TextFeatures | None) -> dict[str, Any] | None:
    """What the card keeps of the text features: their shape and index (the values are weights)."""
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
    unknown: dict[str, Any] | None = None,
) -> None:
    """Write ``out_dir/model.safetensors`` and the card ``out_dir/config.json``. ``model``
    must come from ``create_model`` (it carries its ``architecture``); of ``cfg`` the card
    keeps the input policy alone."""
    architecture = getattr(model, "architecture", None)
    if architecture is None:
        raise ValueError(f"{type(model).__name__} was not built by multifusion.model.create_model; its card cannot say how to rebuild it")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / WEIGHTS) as tmp:
        st_save_model(model, str(tmp))
    card = {
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "architecture": architecture,
        "classes": list(classes),
        "input": asdict(InputPolicy.from_config(cfg)),
        "text": text_record(text),
        "temperature": float(temperature),
    }
    if calibration is not None:
        card["calibration"] = calibration
    if unknown is not None:
        card["unknown"] = unknown
    write_json(out_dir / CONFIG, card)


# ---------------------------------------------------------------------------------------
# Reading and checking the card


def _read_json(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelDirError(f"{path}: damaged, not valid JSON ({one_line(err)}); {REDO}") from None
    if not isinstance(record, dict):
        raise ModelDirError(f"{path}: not a model card (a JSON object); {REDO}")
    return record


def _from_format_1(record: dict[str, Any], path: Path) -> dict[str, Any]:
    """The card of a format-1 config.json (the whole params file inside)."""
    for key in ("model_name", "architecture", "config", "classes", "text", "temperature"):
        if key not in record:
            raise ModelDirError(f"{path}: no {key!r} entry; not a model written by multifusion's save_model; {REDO}")
    cfg, filled = legacy_config(record, path)
    if record["architecture"] == "baseline":
        architecture = {"name": record["model_name"], "args": {}}
    else:
        from multifusion.model import multifusion_args

        architecture = {"name": "multifusion", "args": multifusion_args(cfg)}
    card = {key: record[key] for key in ("model_name", "classes", "text", "temperature")}
    card |= {"format_version": 1, "architecture": architecture, "input": asdict(InputPolicy.from_config(cfg)), "filled": filled}
    if "calibration" in record:
        card["calibration"] = record["calibration"]
    return card


def read_card(path: str | Path) -> dict[str, Any]:
    """A model's config.json as a card of format 2 (format 1 converted), checked for every
    entry :func:`load_model` reads. ModelDirError names the file, the problem and the fix."""
    path = Path(path)
    record = _read_json(path)
    version = record.get("format_version", 1)
    if version == 1 and "config" in record:
        card = _from_format_1(record, path)
    elif version == FORMAT_VERSION:
        missing = [key for key in CARD_KEYS if key not in record]
        if missing:
            raise ModelDirError(f"{path}: no {', '.join(map(repr, missing))} entry in the model card; {REDO}")
        card = record
        if isinstance(card["input"], dict):
            card["input"] = INPUT_KEYS_ADDED | card["input"]
    else:
        raise ModelDirError(f"{path}: model card format {version!r}; this multifusion reads formats 1 and {FORMAT_VERSION}: "
                            "upgrade multifusion (`pip install -U multifusion`) or load it with the version that saved it")
    _check_card(card, path)
    return card


def _check_card(card: dict[str, Any], path: Path) -> None:
    classes, temperature, arch = card["classes"], card["temperature"], card["architecture"]
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise ModelDirError(f"{path}: 'classes' must list at least 2 class names, got {classes!r}; {REDO}")
    if len(set(classes)) != len(classes):
        raise ModelDirError(f"{path}: 'classes' names a class twice ({classes!r}); {REDO}")
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ModelDirError(f"{path}: 'temperature' must be a positive number, got {temperature!r}; {REDO}")
    if not (isinstance(arch, dict) and isinstance(arch.get("name"), str) and isinstance(arch.get("args", {}), dict)):
        raise ModelDirError(f"{path}: 'architecture' must be {{\"name\": ..., \"args\": {{...}}}}, got {arch!r}; {REDO}")
    text = card["text"]
    if text is not None and set(text.get("class_names", [])) != set(classes):
        raise ModelDirError(f"{path}: the text record describes classes {sorted(set(text.get('class_names', [])))} but "
                            f"'classes' lists {sorted(classes)}; {REDO}")
    try:
        InputPolicy(**card["input"])
    except TypeError as err:
        raise ModelDirError(f"{path}: 'input' is not an input policy ({one_line(err)}); {REDO}") from None


# ---------------------------------------------------------------------------------------
# Loading


def _rebuild(card: dict[str, Any], path: Path) -> nn.Module:
    """The (untrained) module that the card describes."""
    arch, classes = card["architecture"], card["classes"]
    try:
        return create_model(arch["name"], len(classes), card["input"]["image_size"], text=placeholder_text(card["text"]),
                            classes=classes, **arch.get("args", {}))
    except (ValueError, KeyError, TypeError, IndexError) as err:
        reason = one_line(err).split(";")[0]  # the fact, without advice meant for params.yaml
        raise ModelDirError(f"{path}: the model cannot be rebuilt from it ({reason}); {REDO}") from None


def _fix(card: dict[str, Any], otherwise: str) -> str:
    """The advice of an error met after filling format-1 keys from params.yaml: they may be the cause."""
    filled = card.get("filled") or {}
    if not filled:
        return otherwise
    them = "it" if len(filled) == 1 else "them"
    return f"{', '.join(filled)} came from params.yaml: set {them} in {CONFIG} to the values the model was trained with"


def _load_weights(model: nn.Module, weights: Path, config: Path, card: dict[str, Any]) -> None:
    """Strictly load ``weights`` into ``model``; a damaged file or a mismatch names the fix."""
    try:
        st_load_model(model, str(weights), strict=True, device="cpu")
    except RuntimeError as err:  # strict loading: missing, unexpected or mis-shaped tensors
        details = [line.strip() for line in str(err).splitlines()[1:] if line.strip()] or [one_line(err)]
        more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
        fix = _fix(card, f"the two files come from different models: {REDO}")
        raise ModelDirError(f"{weights}: does not match {config.name}: {details[0]}{more}; {fix}") from None
    except Exception as err:  # noqa: BLE001 -- SafetensorError, OSError: a truncated or foreign file
        raise ModelDirError(f"{weights}: damaged or truncated ({one_line(err)}); {REDO}") from None


def _check_labels(model: nn.Module, card: dict[str, Any], config: Path) -> None:
    """The stored description labels must be what the card's class order gives: a card whose
    classes were reordered would mislabel every image."""
    stored = getattr(getattr(model, "head", None), "text_classes", None)
    if stored is None or card["text"] is None:
        return
    from multifusion.model.hnf import description_classes

    expected = description_classes(placeholder_text(card["text"]), card["classes"])
    if not torch.equal(stored.cpu(), expected):
        raise ModelDirError(f"{config}: 'classes' is not in the order the weights were trained with (the descriptions' "
                            f"labels disagree); restore the original config.json: {REDO}")


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a saved model from ``model_dir`` (config.json + model.safetensors), eval mode.
    A missing file raises FileNotFoundError, a damaged or mismatched one ModelDirError."""
    model_dir = Path(model_dir)
    for name in (CONFIG, WEIGHTS):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name}: missing; pass the directory of a trained model "
                                    "(config.json + model.safetensors), or train one (`dvc repro train`)")
    config = model_dir / CONFIG
    card = read_card(config)
    model = _rebuild(card, config)
    _load_weights(model, model_dir / WEIGHTS, config, card)
    _check_labels(model, card, config)
    model.to(device).eval()
    return LoadedModel(
        model=model,
        classes=list(card["classes"]),
        temperature=float(card["temperature"]),
        model_name=str(card["model_name"]),
        input=InputPolicy(**card["input"]),
        architecture=card["architecture"],
        calibration=card.get("calibration"),
        unknown=card.get("unknown"),
    )
