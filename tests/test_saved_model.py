"""Saved models (multifusion.model.card): config.json is a model card that carries only the
model; a model directory loads and predicts anywhere without params.yaml; the card is checked
against itself and the weights (one-line errors); format-1 directories (the whole params file
inside) still load, keys added since filled with a note, unknown keys and filled keys the
weights contradict named."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from multifusion.evaluation.evaluate import predict_probs
from multifusion.model import build_model, card_v1, create_model, list_models
from multifusion.model.card import CONFIG, FORMAT_VERSION, FilledParamsWarning, ModelDirError, load_model, save_model
from multifusion.text.features import random_text_features

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OLD_MODEL = FIXTURES / "model_before_global_token"  # format 1, written by fixtures/make_model_before_global_token.py
CLASSES = ["Fibres", "Particles", "Powder"]
TINY = {"data.image_size": 16, "hnf.stem": "conv", "hnf.layers": 2, "hnf.dim": 16, "hnf.heads": 2, "fusion.heads": 2,
        "graph.k": 4, "hnf.ode.solver": "euler", "hnf.ode.steps": 1}
CARD_KEYS = {"format_version", "model_name", "architecture", "classes", "input", "text", "temperature"}


def fixed_images() -> np.ndarray:
    """(4, 16, 16) uint8, as make_model_before_global_token.fixed_images."""
    return np.random.default_rng(0).integers(0, 256, (4, 16, 16), dtype=np.uint8)


def edit_card(model_dir: Path, edit) -> None:
    record = json.loads((model_dir / CONFIG).read_text())
    edit(record)
    (model_dir / CONFIG).write_text(json.dumps(record))


@pytest.fixture
def tiny_model(make_config, tmp_path):
    """(model dir, cfg, probs of fixed_images at saving time) of a small MultiFusion with text."""
    cfg = make_config(TINY)
    torch.manual_seed(0)
    text = random_text_features(CLASSES, length=5, dim=8)
    model = build_model(cfg, CLASSES, text).eval()
    save_model(tmp_path / "m", model, cfg, CLASSES, text, 1.5, "hnf")
    return tmp_path / "m", cfg, predict_probs(model, fixed_images(), 4, "cpu", 1.5)


def test_the_card_holds_the_model_alone(tiny_model):
    model_dir, cfg, _ = tiny_model
    card = json.loads((model_dir / CONFIG).read_text())
    assert set(card) == CARD_KEYS and card["format_version"] == FORMAT_VERSION
    assert card["architecture"]["name"] == "multifusion"
    assert set(card["architecture"]["args"]) == {"hnf", "graph", "fusion"}  # its own sections, no others
    assert card["input"] == {"image_size": 16, "aspect": cfg.data.aspect, "infobar": cfg.data.infobar,
                             "grey_levels": cfg.data.grey_levels, "max_pixels": cfg.data.max_pixels, "tta": cfg.evaluate.tta}
    assert "compare" not in json.dumps(card) and "robustness" not in json.dumps(card)


def test_an_unrelated_params_section_leaves_the_card_unchanged(make_config, tmp_path):
    cards = []
    for extra in ({}, {"predict.top_k": 5, "compare.set": "other", "train.epochs": 99}):
        cfg = make_config(dict(TINY, **{"fusion.text": False}, **extra))
        torch.manual_seed(0)
        save_model(tmp_path / str(len(cards)), build_model(cfg, CLASSES, None), cfg, CLASSES, None, 1.0, "hnf")
        cards.append((tmp_path / str(len(cards)) / CONFIG).read_bytes())
    assert cards[0] == cards[1]


def test_a_model_dir_copied_to_an_empty_folder_loads_and_predicts_without_params(tiny_model, tmp_path, monkeypatch):
    model_dir, _, expected = tiny_model
    elsewhere = tmp_path / "empty" / "model"
    shutil.copytree(model_dir, elsewhere)
    monkeypatch.chdir(tmp_path / "empty")  # no ./params.yaml
    monkeypatch.setattr(card_v1, "PACKAGE_PARAMS", tmp_path / "absent.yaml")  # nor the source tree's
    with warnings.catch_warnings():
        warnings.simplefilter("error", FilledParamsWarning)
        loaded = load_model("model")
    assert loaded.classes == CLASSES and loaded.temperature == 1.5 and loaded.input.image_size == 16
    np.testing.assert_allclose(predict_probs(loaded.model, fixed_images(), 4, "cpu", loaded.temperature), expected, atol=1e-6)


def test_reordered_classes_are_one_line(tiny_model):
    model_dir, _, _ = tiny_model
    edit_card(model_dir, lambda c: c.update(classes=list(reversed(c["classes"]))))
    with pytest.raises(ModelDirError, match=r"config.json: 'classes' is not in the order the weights were trained with"):
        load_model(model_dir)


def test_classes_the_text_record_does_not_describe_are_one_line(tiny_model):
    model_dir, _, _ = tiny_model
    edit_card(model_dir, lambda c: c.update(classes=["Fibres", "Particles", "Tips"]))
    with pytest.raises(ModelDirError, match=r"config.json: the text record describes classes .* but 'classes' lists"):
        load_model(model_dir)


def test_a_class_count_the_head_does_not_have_is_one_line(make_config, tmp_path):
    cfg = make_config(dict(TINY, **{"fusion.text": False}))
    save_model(tmp_path / "m", build_model(cfg, CLASSES, None), cfg, CLASSES, None, 1.0, "hnf")
    edit_card(tmp_path / "m", lambda c: c["classes"].append("Tips"))
    with pytest.raises(ModelDirError, match=r"model.safetensors: does not match config.json: .*size mismatch"):
        load_model(tmp_path / "m")


def test_a_card_from_before_the_grey_level_policy_loads_as_raw(tiny_model):
    """Cards written before input.grey_levels existed fed raw grey levels: they load so, with no
    warning, and the format-1 fixture too (its FilledParamsWarning names hnf keys only)."""
    model_dir, _, probs = tiny_model
    edit_card(model_dir, lambda c: c["input"].pop("grey_levels"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_model(model_dir)
    assert loaded.input.grey_levels == "raw"
    np.testing.assert_allclose(predict_probs(loaded.model, fixed_images(), 4, "cpu", loaded.temperature), probs, atol=1e-6)
    with pytest.warns(FilledParamsWarning, match="hnf"):
        assert load_model(OLD_MODEL).input.grey_levels == "raw"


def test_a_newer_card_format_is_one_line(tiny_model):
    model_dir, _, _ = tiny_model
    edit_card(model_dir, lambda c: c.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ModelDirError, match=r"model card format 3; this multifusion reads formats 1 and 2: upgrade"):
        load_model(model_dir)


def test_every_model_is_built_by_name_through_one_registry():
    assert {"multifusion", "resnet18", "resnet50", "vit_small", "swin_tiny", "vig"} <= set(list_models())
    model = create_model("resnet18", num_classes=4, image_size=32)
    assert model.architecture == {"name": "resnet18", "args": {}}
    with pytest.raises(ValueError, match=r"unknown model 'resnet101'; choose one of"):
        create_model("resnet101", 4, 32)


# ---------------------------------------------------------------------------------------
# Format 1: config.json holding the whole params file


def test_a_format_1_model_loads_with_keys_added_since_and_predicts_as_saved(repo_root):
    stored = json.loads((OLD_MODEL / CONFIG).read_text())["config"]["hnf"]
    assert "global_token" not in stored and "stem_width" not in stored  # the fixture is the old layout
    with pytest.warns(FilledParamsWarning, match=r"saved before params.yaml had hnf.stem_width, hnf.stem_depth, hnf.global_token; "
                                                  r"using the current values from .*params.yaml: hnf.stem_width=\d+, hnf.stem_depth=\d+, hnf.global_token=true$"):
        loaded = load_model(OLD_MODEL)
    current = yaml.safe_load((repo_root / "params.yaml").read_text())["hnf"]
    args = loaded.architecture["args"]["hnf"]
    assert args["global_token"] == current["global_token"] and args["stem_width"] == current["stem_width"]
    assert loaded.classes == CLASSES and loaded.temperature == 1.25
    expected = np.array(json.loads((OLD_MODEL / "expected.json").read_text())["probs"])  # (4, 3) at saving time
    np.testing.assert_allclose(predict_probs(loaded.model, fixed_images(), 4, "cpu", loaded.temperature), expected, atol=2e-6)


def test_a_format_1_key_this_version_does_not_know_is_an_error(tmp_path):
    shutil.copytree(OLD_MODEL, tmp_path / "m")
    edit_card(tmp_path / "m", lambda c: c["config"]["hnf"].update(retired_switch=True))
    with pytest.raises(ModelDirError, match=r"config.json: its params hold keys this version of multifusion does not know "
                                            r"\(hnf.retired_switch\); load it with the version that saved it"):
        load_model(tmp_path / "m")


def test_a_format_1_key_neither_stored_nor_in_any_params_yaml_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(card_v1, "PACKAGE_PARAMS", tmp_path / "absent.yaml")
    monkeypatch.chdir(tmp_path)  # no ./params.yaml either
    with pytest.raises(ModelDirError, match=r"saved before params.yaml had hnf.stem_width, hnf.stem_depth, hnf.global_token, and no params.yaml "
                                            r"here has no value for them; run from the project root or add them to config.json"):
        load_model(OLD_MODEL)


def test_a_format_1_filled_key_the_weights_contradict_is_named(make_config, tmp_path):
    """Trained without the global token, saved in format 1, then the key removed: filling
    today's default (true) builds a model the weights do not fit; the error says which key to set."""
    cfg = make_config(dict(TINY, **{"hnf.global_token": False, "fusion.text": False}))
    torch.manual_seed(0)
    save_model(tmp_path / "m", build_model(cfg, CLASSES, None), cfg, CLASSES, None, 1.0, "hnf")
    format_1 = {"model_name": "hnf", "architecture": "hnf", "config": cfg.to_dict(), "classes": CLASSES, "text": None, "temperature": 1.0}
    (tmp_path / "m" / CONFIG).write_text(json.dumps(format_1))
    edit_card(tmp_path / "m", lambda c: c["config"]["hnf"].pop("global_token"))
    with pytest.warns(FilledParamsWarning), pytest.raises(
        ModelDirError, match=r"model.safetensors: does not match config.json: .*; hnf.global_token came from "
                             r"params.yaml: set it in config.json to the values the model was trained with"):
        load_model(tmp_path / "m")
    edit_card(tmp_path / "m", lambda c: c["config"]["hnf"].update(global_token=False))  # the fix the error names
    assert load_model(tmp_path / "m").architecture["args"]["hnf"]["global_token"] is False
