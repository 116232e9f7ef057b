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

from multifusion.config import Config, config_from_dict
from multifusion.text.features import TextFeatures

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "last.pt"
BASELINES_MODULE = "multifusion.model.baselines"


@dataclass
class LoadedModel:
    model: nn.Module            # in eval mode, on the requested device
    cfg: Config
    classes: list[str]
    temperature: float
    model_name: str


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
) -> None:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json``."""
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
    (out_dir / CONFIG).write_text(json.dumps(record, indent=2) + "\n")


def build_from_record(record: dict[str, Any], cfg: Config) -> nn.Module:
    num_classes = len(record["classes"])
    if record["architecture"] == "baseline":
        from multifusion.model.baselines import build_baseline

        return build_baseline(record["model_name"], num_classes, cfg.data.image_size)
    from multifusion.model import build_model

    return build_model(cfg, num_classes, placeholder_text(record["text"]))


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a saved model from ``model_dir`` (config.json + model.safetensors), eval mode."""
    model_dir = Path(model_dir)
    for name in (CONFIG, WEIGHTS):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name}: missing; train a model first (`dvc repro train`)")
    record = json.loads((model_dir / CONFIG).read_text())
    cfg = config_from_dict(record["config"])
    model = build_from_record(record, cfg)
    st_load_model(model, str(model_dir / WEIGHTS), strict=True, device="cpu")
    model.to(device).eval()
    return LoadedModel(
        model=model,
        cfg=cfg,
        classes=list(record["classes"]),
        temperature=float(record["temperature"]),
        model_name=str(record["model_name"]),
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
    """The checkpoint in ``checkpoint_dir`` if it belongs to this run (same fingerprint), else None."""
    path = Path(checkpoint_dir) / TRAIN_STATE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file: start over rather than crash
        print(f"{path}: unreadable checkpoint ({exc.__class__.__name__}); starting from scratch")
        return None
    if state.get("fingerprint") != fingerprint:
        print(f"{path}: checkpoint from other params, model or data; starting from scratch")
        return None
    return state
