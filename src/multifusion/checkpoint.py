"""Saving and loading models, and the per-epoch training checkpoint.

A trained model is a directory (``models/hnf/``):

    model.safetensors   the state dict (text features included: they are model buffers)
    config.json         {"model_name", "architecture", "config" (the full Config dict),
                         "classes", "text" (shape + index of the descriptions), "temperature"}

``load_model`` rebuilds the module from config.json (``multifusion.model.build_model`` for
MultiFusion, ``multifusion.model.baselines.build_baseline`` for a comparison baseline) and
loads the weights strictly, so a mismatch between code and weights is an error, not a
silently half-loaded model.

The training checkpoint (``checkpoints/train/last.pt``) holds everything ``fit`` needs to
continue after a kill: weights, optimizer, scheduler, RNG states, epoch, best score, best
weights, the metric history, and a fingerprint of the run so a stale checkpoint left by
other params is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from multifusion.cli_errors import UserError, one_line
from multifusion.config import Config, ConfigError, config_from_dict
from multifusion.text.features import TextFeatures

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "last.pt"
BASELINES_MODULE = "multifusion.model.baselines"
RECORD_KEYS = ("model_name", "architecture", "config", "classes", "text", "temperature")
REDO = "copy the whole model directory again, or retrain it (`dvc repro train`)"
# What a training checkpoint may hold beyond tensors and plain Python: numpy's RNG state
# (a uint32 array) and numpy scalars in the metric history. Nothing else is unpickled.
CHECKPOINT_GLOBALS = [
    np._core.multiarray._reconstruct, np._core.multiarray.scalar, np.ndarray, np.dtype,
    np.dtypes.UInt32DType, np.dtypes.Int64DType, np.dtypes.Float32DType, np.dtypes.Float64DType,
]


class ModelDirError(UserError, ValueError):
    """A model directory that cannot be loaded; the message names the file, the problem and the fix."""


@dataclass
class LoadedModel:
    model: nn.Module            # in eval mode, on the requested device
    cfg: Config
    classes: list[str]
    temperature: float
    model_name: str
    calibration: dict[str, Any] | None = None  # how the temperature was chosen (None: not recorded)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def architecture_of(model: nn.Module) -> str:
    """"baseline" for a module defined under multifusion.model.baselines, else "hnf"."""
    return "baseline" if type(unwrap(model)).__module__.startswith(BASELINES_MODULE) else "hnf"


def text_record(text: TextFeatures | None) -> dict[str, Any] | None:
    if text is None:
        return None
    T, L, D = text.token_states.shape
    return {
        "shape": [T, L, D],
        "sentence_dim": int(text.sentence_embeddings.shape[1]),
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
        sentence_embeddings=torch.zeros(T, record["sentence_dim"]),
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
    model = unwrap(model)
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
    (out_dir / CONFIG).write_text(json.dumps(record, indent=2) + "\n")


def build_from_record(record: dict[str, Any], cfg: Config) -> nn.Module:
    num_classes = len(record["classes"])
    if record["architecture"] == "baseline":
        from multifusion.model.baselines import build_baseline

        return build_baseline(record["model_name"], num_classes, cfg.data.image_size)
    from multifusion.model import build_model

    return build_model(cfg, num_classes, placeholder_text(record["text"]))


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


def model_config(record: dict[str, Any], path: Path) -> Config:
    """The params a model was trained with (``record``: its config.json at ``path``)."""
    try:
        return config_from_dict(record["config"])
    except ConfigError as err:
        raise ModelDirError(f"{path}: its params do not fit this version of multifusion "
                            f"({str(err).removeprefix('params.yaml: ').split(';')[0]}); retrain with it (`dvc repro train`)") from None


def _rebuild(record: dict[str, Any], path: Path) -> tuple[Config, nn.Module]:
    """The Config and the (untrained) module that config.json describes."""
    cfg = model_config(record, path)
    try:
        return cfg, build_from_record(record, cfg)
    except (ValueError, KeyError, TypeError, IndexError) as err:
        reason = one_line(err).split(";")[0]  # the fact, without advice meant for params.yaml
        raise ModelDirError(f"{path}: the model cannot be rebuilt from it ({reason}); {REDO}") from None


def _load_weights(model: nn.Module, weights: Path, config: Path) -> None:
    """Strictly load ``weights`` into ``model``; a damaged file or a mismatch names the fix."""
    try:
        st_load_model(model, str(weights), strict=True, device="cpu")
    except RuntimeError as err:  # strict loading: missing, unexpected or mis-shaped tensors
        details = [line.strip() for line in str(err).splitlines()[1:] if line.strip()] or [one_line(err)]
        more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
        raise ModelDirError(f"{weights}: does not match {config.name}: {details[0]}{more}; the two files come "
                            f"from different models: {REDO}") from None
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
    cfg, model = _rebuild(record, model_dir / CONFIG)
    _load_weights(model, model_dir / WEIGHTS, model_dir / CONFIG)
    model.to(device).eval()
    return LoadedModel(
        model=model,
        cfg=cfg,
        classes=list(record["classes"]),
        temperature=float(record["temperature"]),
        model_name=str(record["model_name"]),
        calibration=record.get("calibration"),
    )


# ---------------------------------------------------------------------------------------
# Training checkpoint


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes and values of a state dict (architecture + init + text)."""
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_fingerprint(cfg: Config, model_name: str, initial_state: dict[str, torch.Tensor], data_key: str, world_size: int) -> str:
    """What a checkpoint must match to be resumed: params that shape training, the model's
    initial weights, the data and the number of processes."""
    sections = {k: v for k, v in cfg.to_dict().items() if k in ("seed", "data", "hnf", "graph", "fusion", "train")}
    payload = json.dumps(
        {"cfg": sections, "model_name": model_name, "data": data_key, "world_size": world_size}, sort_keys=True
    )
    return hashlib.sha256((payload + state_fingerprint(initial_state)).encode()).hexdigest()


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_training_state(checkpoint_dir: str | Path, state: dict[str, Any]) -> None:
    """Atomically write ``checkpoint_dir/last.pt`` (a kill mid-write leaves the old one)."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint_dir / (TRAIN_STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, checkpoint_dir / TRAIN_STATE)


def load_training_state(checkpoint_dir: str | Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint in ``checkpoint_dir`` if it belongs to this run (same fingerprint), else None.

    Loaded with ``weights_only=True``: tensors, plain Python and the numpy types of
    CHECKPOINT_GLOBALS only, so a foreign or tampered file cannot run code. Its fingerprint
    is checked before anything else in it is used."""
    path = Path(checkpoint_dir) / TRAIN_STATE
    if not path.is_file():
        return None
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- a truncated or foreign file: start over rather than crash
        print(f"{path}: unreadable checkpoint ({exc.__class__.__name__}: {one_line(exc)[:200]}); starting from scratch")
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        print(f"{path}: checkpoint from other params, model or data; starting from scratch")
        return None
    return state
