"""Saved models (multifusion.model.card): a model saved before params.yaml gained keys loads
with the current values filled in and a note naming them, and predicts as it did when it was
saved; unknown keys, keys nobody has a value for, and filled keys the weights contradict are
one-line errors naming the keys."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from multifusion.model import card as saved_model
from multifusion.evaluation.evaluate import predict_probs
from multifusion.model import build_model
from multifusion.model.card import CONFIG, FilledParamsWarning, ModelDirError, load_model, save_model
from multifusion.text.features import random_text_features

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OLD_MODEL = FIXTURES / "model_before_global_token"  # written by fixtures/make_model_before_global_token.py
CLASSES = ["Fibres", "Particles", "Powder"]
TINY = {"data.image_size": 16, "hnf.stem": "conv", "hnf.layers": 2, "hnf.dim": 16, "hnf.heads": 2, "fusion.heads": 2,
        "graph.k": 4, "hnf.ode.solver": "euler", "hnf.ode.steps": 1}


def fixed_images() -> np.ndarray:
    """(4, 16, 16) uint8, as make_model_before_global_token.fixed_images."""
    return np.random.default_rng(0).integers(0, 256, (4, 16, 16), dtype=np.uint8)


def edit_config(model_dir: Path, edit) -> None:
    record = json.loads((model_dir / CONFIG).read_text())
    edit(record["config"])
    (model_dir / CONFIG).write_text(json.dumps(record))


def test_a_model_saved_before_new_params_loads_with_their_current_values_and_predicts(repo_root):
    stored = json.loads((OLD_MODEL / CONFIG).read_text())["config"]["hnf"]
    assert "global_token" not in stored and "stem_width" not in stored  # the fixture is the old layout
    # the fixture predates hnf.stem_width, hnf.stem_depth, hnf.global_token and compare.recipes
    with pytest.warns(FilledParamsWarning, match=r"saved before params.yaml had hnf.stem_width, hnf.stem_depth, hnf.global_token, compare.recipes; "
                                                  r"using the current values from .*params.yaml: hnf.stem_width=\d+, hnf.stem_depth=\d+, hnf.global_token=true, "
                                                  r"compare.recipes="):
        loaded = load_model(OLD_MODEL)
    current = yaml.safe_load((repo_root / "params.yaml").read_text())["hnf"]
    assert loaded.cfg.hnf.global_token == current["global_token"] and loaded.cfg.hnf.stem_width == current["stem_width"]
    assert loaded.classes == CLASSES and loaded.temperature == 1.25
    expected = np.array(json.loads((OLD_MODEL / "expected.json").read_text())["probs"])  # (4, 3) at saving time
    np.testing.assert_allclose(predict_probs(loaded.model, fixed_images(), 4, "cpu", loaded.temperature), expected, atol=2e-6)


def test_a_model_saved_now_loads_without_a_note(make_config, tmp_path):
    cfg = make_config(TINY)
    torch.manual_seed(0)
    text = random_text_features(CLASSES, length=5, dim=8)
    save_model(tmp_path / "m", build_model(cfg, CLASSES, text), cfg, CLASSES, text, 1.0, "hnf")
    assert "sentence_dim" not in json.loads((tmp_path / "m" / CONFIG).read_text())["text"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FilledParamsWarning)
        assert load_model(tmp_path / "m").cfg == cfg


def test_a_stored_key_this_version_does_not_know_is_an_error(tmp_path):
    shutil.copytree(OLD_MODEL, tmp_path / "m")
    edit_config(tmp_path / "m", lambda c: c["hnf"].update(retired_switch=True))
    with pytest.raises(ModelDirError, match=r"config.json: its params hold keys this version of multifusion does not know "
                                            r"\(hnf.retired_switch\); load it with the version that saved it"):
        load_model(tmp_path / "m")


def test_a_key_neither_stored_nor_in_any_params_yaml_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(saved_model, "PACKAGE_PARAMS", tmp_path / "absent.yaml")
    monkeypatch.chdir(tmp_path)  # no ./params.yaml either
    with pytest.raises(ModelDirError, match=r"saved before params.yaml had hnf.stem_width, hnf.stem_depth, hnf.global_token, compare.recipes, and no params.yaml "
                                            r"here has no value for them; run from the project root or add them to config.json"):
        load_model(OLD_MODEL)


def test_a_filled_key_the_weights_contradict_is_named(make_config, tmp_path):
    """Trained without the global token, saved, then the key removed: filling today's default
    (true) builds a model the weights do not fit; the error says which key to set."""
    cfg = make_config(dict(TINY, **{"hnf.global_token": False, "fusion.text": False}))
    torch.manual_seed(0)
    save_model(tmp_path / "m", build_model(cfg, CLASSES, None), cfg, CLASSES, None, 1.0, "hnf")
    edit_config(tmp_path / "m", lambda c: c["hnf"].pop("global_token"))
    with pytest.warns(FilledParamsWarning), pytest.raises(
        ModelDirError, match=r"model.safetensors: does not match config.json: .*; hnf.global_token came from "
                             r"params.yaml: set it in config.json to the values the model was trained with"):
        load_model(tmp_path / "m")
    edit_config(tmp_path / "m", lambda c: c["hnf"].update(global_token=False))  # the fix the error names
    assert load_model(tmp_path / "m").cfg == cfg
