"""`multifusion predict`: every input gets a row, bad files a reason, predictions equal the
evaluate stage's for the same images, the contact sheet is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from multifusion.cli import app
from multifusion.data.preprocess import load_micrograph
from multifusion.evaluation.evaluate import predict_probs
from multifusion.model import build_model
from multifusion.inference.predict import expand_inputs, predict_paths
from multifusion.model.card import save_model

CLASSES = ["Fibres", "Particles", "Powder"]
TEMPERATURE = 1.7


def micrograph(seed: int, width: int = 120, height: int = 90) -> np.ndarray:
    """A grey 4:3 'micrograph' with a dark info bar with white text-like marks at the bottom."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = 110 + 60 * np.sin(xx / (3 + seed % 5)) * np.cos(yy / (4 + seed % 3)) + rng.normal(0, 8, (height, width))
    image[-10:] = 0
    image[-7:-3, 5:40:3] = 255
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture
def model_dir(tmp_path, make_config) -> Path:
    # a small graph trunk: untrained, the full-width one (eval-mode BatchNorm at its initial
    # statistics) grows activations to ~1e7, where batch-size rounding flips kNN near-ties
    cfg = make_config({"hnf.layers": 1, "hnf.dim": 16, "hnf.stem_width": 32, "hnf.stem_depth": 2, "data.image_size": 32, "fusion.text": False})
    model = build_model(cfg, CLASSES, None)
    save_model(tmp_path / "model", model, cfg, CLASSES, None, TEMPERATURE, "hnf")
    return tmp_path / "model"


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "shots"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(micrograph(0)).save(root / "a.png")
    Image.fromarray(micrograph(1)).save(root / "b.tif")
    Image.fromarray(micrograph(2)).save(root / "sub" / "c.png")
    (root / "corrupt.tif").write_bytes(b"II*\x00" + b"\x07" * 200)  # TIFF magic, garbage body
    (root / "notes.txt").write_text("not a micrograph\n")
    (root / ".hidden.png").write_bytes(b"skipped")
    return root


GOOD = ["a.png", "b.tif", "sub/c.png"]
BAD = ["corrupt.tif", "notes.txt"]


def run(model_dir: Path, inputs, tmp_path: Path, **kw) -> pd.DataFrame:
    options = dict(top_k=2, uncertain_threshold=0.5, batch_size=2, progress=False) | kw
    result = predict_paths(model_dir, inputs, tmp_path / "out" / "predictions.csv", **options)
    table = pd.read_csv(tmp_path / "out" / "predictions.csv", dtype=str, keep_default_na=False)
    assert len(table) == len(result.table)
    return table


def test_folder_with_bad_files_gives_a_row_each(model_dir, folder, tmp_path):
    sheet = tmp_path / "sheet.png"
    table = run(model_dir, [folder], tmp_path, contact_sheet=sheet)
    names = [str(Path(p).relative_to(folder)) for p in table["path"]]
    assert sorted(names) == sorted(GOOD + BAD)  # recursive, hidden file skipped
    assert list(table.columns) == [
        "path", "status", "top1_class", "top1_prob", "top2_class", "top2_prob", "uncertain", "ood_score", "unknown",
        "abstained", "error",
    ]
    by_name = table.set_index(pd.Index(names))
    for name in GOOD:
        row = by_name.loc[name]
        assert row.status == "ok" and row.error == ""
        assert row.top1_class in CLASSES and row.top2_class in CLASSES and row.top1_class != row.top2_class
        assert 1.0 >= float(row.top1_prob) >= float(row.top2_prob) > 0.0
        assert row.uncertain == str(float(row.top1_prob) < 0.5)
    for name in BAD:
        row = by_name.loc[name]
        assert row.status == "error" and len(row.error) > 5 and row.top1_class == ""
    with Image.open(sheet) as im:  # contact sheet of the readable images
        assert im.format == "PNG" and im.size[0] > 100


def test_predictions_equal_evaluate_predict_probs(model_dir, folder, tmp_path):
    from multifusion.model.card import load_model

    loaded = load_model(model_dir)
    assert loaded.temperature == TEMPERATURE
    paths = [folder / name for name in GOOD]
    images = np.stack([load_micrograph(p, loaded.input) for p in paths])  # (3, 32, 32)
    assert images.shape == (3, 32, 32)
    probs = predict_probs(loaded.model, images, 64, "cpu", TEMPERATURE, loaded.input.tta)  # (3, C): the test-time policy
    if loaded.input.tta:  # the 8-view average is a different answer from the single view
        assert not np.allclose(probs, predict_probs(loaded.model, images, 64, "cpu", TEMPERATURE, False), atol=1e-6)
    table = run(model_dir, [str(p) for p in paths], tmp_path, top_k=3, batch_size=2)
    assert list(table["path"]) == [str(p) for p in paths]  # input order kept
    ranked = np.argsort(-probs, axis=1, kind="stable")
    for i, row in table.iterrows():
        for r in range(3):
            assert row[f"top{r + 1}_class"] == CLASSES[ranked[i, r]]
            assert float(row[f"top{r + 1}_prob"]) == pytest.approx(probs[i, ranked[i, r]], abs=1e-6)
    raw = predict_probs(loaded.model, images, 64, "cpu", 1.0, loaded.input.tta)
    assert not np.allclose(raw, probs)  # so the calibrated (T=1.7) values are the ones in the CSV


def test_uncertain_flag_follows_threshold(model_dir, folder, tmp_path):
    files = [str(folder / name) for name in GOOD]
    assert (run(model_dir, files, tmp_path, uncertain_threshold=1.0)["uncertain"] == "True").all()
    assert (run(model_dir, files, tmp_path, uncertain_threshold=0.0)["uncertain"] == "False").all()


def test_expand_inputs_globs_missing_and_duplicates(folder):
    items = expand_inputs([str(folder / "*.png"), folder / "a.png", str(folder / "**" / "*.png"), folder / "nope.tif"])
    paths = [p for p, _ in items]
    assert paths == [folder / "a.png", folder / "sub" / "c.png", folder / "nope.tif"]
    assert [problem for _, problem in items][:2] == [None, None]
    assert "no such file" in items[2][1]
    assert "matches" in expand_inputs([str(folder / "*.jpeg")])[0][1]


def test_cli_exit_codes(model_dir, folder, tmp_path, repo_root):
    runner = CliRunner()
    out = tmp_path / "cli.csv"
    common = ["predict", "--model", str(model_dir), "--params", str(repo_root / "params.yaml")]
    ok = runner.invoke(app, [*common, str(folder), "--out", str(out), "--contact-sheet", str(tmp_path / "s.png")])
    assert ok.exit_code == 0, ok.output
    assert len(pd.read_csv(out)) == len(GOOD + BAD) and (tmp_path / "s.png").is_file()
    bad = runner.invoke(app, [*common, str(folder / "corrupt.tif"), str(folder / "notes.txt"), "--out", str(out)])
    assert bad.exit_code == 1
    table = pd.read_csv(out, keep_default_na=False)
    assert (table["status"] == "error").all() and len(table) == 2
    missing_model = runner.invoke(app, ["predict", "--model", str(tmp_path / "none"), str(folder), "--out", str(out)])
    assert missing_model.exit_code == 2 and "config.json" in missing_model.output


def test_explain_gives_predicts_call_and_probability(model_dir, folder, tmp_path):
    """explain takes predict's inference path (issue 25): the same 8 test-time views and the
    same temperature, so the class it explains and its probability are predict's top 1."""
    from multifusion.inference.overlays import explain_paths
    from multifusion.model.card import load_model

    files = [str(folder / name) for name in GOOD]
    table = run(model_dir, files, tmp_path, top_k=1)
    rows = explain_paths(model_dir, files, tmp_path / "figures", size=64)
    assert [r["path"] for r in rows] == table["path"].tolist()
    assert [r["class"] for r in rows] == table["top1_class"].tolist()
    assert [r["probability"] for r in rows] == pytest.approx(table["top1_prob"].astype(float).tolist(), abs=1e-6)
    loaded = load_model(model_dir)
    assert loaded.input.tta  # the views differ from a single one, so agreeing above means something
    images = np.stack([load_micrograph(Path(f), loaded.input) for f in files])
    single = predict_probs(loaded.model, images, 64, "cpu", loaded.temperature, False).max(axis=1)
    assert not np.allclose(single, [r["probability"] for r in rows], atol=1e-4)
