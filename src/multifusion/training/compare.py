"""One run of the comparison: a baseline or a MultiFusion ablation, trained and scored
exactly as the main model (same prepared splits, ``train`` section, augmentation, loop).

    cfg_run = variant_config(cfg, "mf_no_text")        # params + the ablation's overrides
    metrics, labels, preds = run_comparison("resnet18", cfg, "data/prepared", "data/text_features",
                                            "models/compare/resnet18/seed43", "checkpoints/compare/resnet18/seed43",
                                            "dvclive/compare/resnet18/seed43", seed=43)

Names: ``multifusion`` (the full model: params.yaml as it is, trained exactly as ``train``
does), the baselines of ``multifusion.model.baselines`` (resnet18, resnet50, vit_small,
swin_tiny, vig) and the keys of ``compare.ablations`` in params.yaml (e.g. mf_no_text:
``{fusion.text: false}``), each a set of dotted overrides on top of params.yaml. The training
seed is ``run_comparison``'s ``seed`` (the stage's ``--seed``, one of ``compare.seeds``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from multifusion.core.config import FULL_MODEL, Config, apply_overrides, config_from_dict
from multifusion.data.dataset import load_prepared
from multifusion.evaluation.evaluate import evaluate_split
from multifusion.core.json_files import write_json
from multifusion.model import build_model
from multifusion.model.baselines import BASELINES, build_baseline
from multifusion.core.runtime import resolve_device
from multifusion.model.card import load_model
from multifusion.text.features import TextFeatures
from multifusion.training.train import fit


# train.* keys that are the comparison's shared budget, not a model's own recipe
RECIPE_BUDGET = ("train.epochs", "train.batch_size", "train.augment", "train.balance", "train.patience")


def check_name(name: str, cfg: Config) -> None:
    if name != FULL_MODEL and name not in BASELINES and name not in cfg.compare.ablations:
        choices = ", ".join([FULL_MODEL, *BASELINES, *cfg.compare.ablations])
        raise ValueError(f"compare: unknown model '{name}'; choose one of {choices} (or add it to compare.ablations in params.yaml)")


def recipe_overrides(cfg: Config, name: str) -> dict[str, Any]:
    """The model's own optimiser settings (``compare.recipes``): dotted ``train.*`` keys only,
    so the budget (epochs, augmentation, splits, test-time policy) stays the same for all."""
    recipe = dict(cfg.compare.recipes.get(name, {}))
    budget = [key for key in recipe if not key.startswith("train.") or any(key == b or key.startswith(b + ".") for b in RECIPE_BUDGET)]
    if budget:
        raise ValueError(
            f"params.yaml: compare.recipes.{name} may set the optimiser only (train.lr, train.weight_decay, "
            f"train.warmup_epochs, ...), not {', '.join(budget)}: the budget is the same for every model"
        )
    return recipe


def variant_config(cfg: Config, name: str) -> Config:
    """``cfg`` with the model's recipe (``compare.recipes``) and, for an ablation, its dotted
    overrides applied."""
    check_name(name, cfg)
    overrides = {**recipe_overrides(cfg, name), **cfg.compare.ablations.get(name, {})}
    return config_from_dict(apply_overrides(cfg.to_dict(), overrides))


def build_variant(name: str, cfg_run: Config, classes: list[str], text: TextFeatures | None) -> nn.Module:
    """A baseline (1 input channel, at data.image_size) or MultiFusion under ``cfg_run``."""
    if name in BASELINES:
        return build_baseline(name, len(classes), cfg_run.data.image_size)
    return build_model(cfg_run, classes, text if cfg_run.fusion.text else None)


def mean_shifted_top1(result: dict[str, Any]) -> float:
    """Accuracy averaged over every shift and severity of an ``evaluate_under_shifts`` result."""
    accs = [entry["accuracy"] for per in result["shifts"].values() for entry in per.values()]
    return float(np.mean(accs)) if accs else float("nan")


def run_comparison(
    name: str,
    cfg: Config,
    prepared_dir: str | Path,
    text_dir: str | Path,
    model_dir: str | Path,
    checkpoint_dir: str | Path,
    live_dir: str | Path,
    seed: int | None = None,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Train ``name`` with ``multifusion.training.train.fit`` at training seed ``seed`` (None: the
    config's ``seed``), score it on the test split; returns the metrics (the keys of
    ``classification_metrics`` plus run facts, the seed among them), the test labels and the
    predictions (N,) each. With ``compare.robustness`` it also writes ``model_dir/robustness.json``."""
    if seed is not None:  # one of compare.seeds: the initial weights, batch order and augmentation draw
        cfg = config_from_dict(apply_overrides(cfg.to_dict(), {"seed": seed}))
    cfg_run = variant_config(cfg, name)
    prepared = load_prepared(prepared_dir)
    text = TextFeatures.load(text_dir) if name not in BASELINES and cfg_run.fusion.text else None
    torch.manual_seed(cfg_run.seed)  # the initial weights are part of the run, as in `train`
    model = build_variant(name, cfg_run, prepared.classes, text)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    started = time.perf_counter()
    # the full model under train's own name: its run (and model card) is the `train` stage's at this seed
    fit(model, cfg_run, prepared_dir, model_dir, checkpoint_dir, live_dir, "hnf" if name == FULL_MODEL else name, text=text)
    train_seconds = time.perf_counter() - started

    loaded = load_model(model_dir)  # what a user gets from models/compare/<name>: the saved best weights
    device = resolve_device(cfg_run.evaluate.device, "evaluate.device")
    loaded.model.to(device)
    metrics, _, labels, preds = evaluate_split(
        loaded.model, prepared, "test", loaded.temperature, cfg_run.evaluate.batch_size, device, cfg_run.evaluate.ece_bins,
        cfg_run.evaluate.tta,
    )
    metrics = {"model": name, "seed": cfg_run.seed, **metrics, "params": int(n_params), "train_seconds": round(train_seconds, 1)}
    if cfg.compare.robustness:
        from multifusion.evaluation.robustness import evaluate_under_shifts

        test = prepared.split_indices("test")
        result = evaluate_under_shifts(
            loaded.model, np.asarray(prepared.images[test]), prepared.labels(test), cfg_run, loaded.temperature, str(device),
            keep_predictions=True,  # per-image calls: the report's paired test per shift level
        )
        write_json(Path(model_dir) / "robustness.json", result)
        metrics["shifted_top1"] = mean_shifted_top1(result)
    return metrics, labels, preds
