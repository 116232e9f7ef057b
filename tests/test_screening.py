"""`multifusion predict` with the screening columns: ``ood_score`` / ``unknown`` from the
model's fitted score (bad input never unknown), ``--target-accuracy`` abstention from the val
curve (rows kept, marked), adaptive views (:class:`ViewPolicy`), and the report's unknown filter and drift warning
(headless Chromium)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from headless import body_attrs, browse
from test_predict import BAD, CLASSES, GOOD, TEMPERATURE, folder  # noqa: F401 -- the shared folder of good and bad files

from multifusion.core.config import ConfigError, load_config
from multifusion.data.dataset import to_model_input
from multifusion.evaluation.evaluate import dihedral_views, predict_logits
from multifusion.evaluation import spectrum
from multifusion.evaluation.ood import fit_unknown, kth_distance, knn_score, save_unknown_tensors
from multifusion.evaluation.selective import risk_coverage
from multifusion.inference.predict import predict_paths, read_one
from multifusion.inference.views import VIEW_ORDER, ViewPolicy, screen_outputs
from multifusion.model import build_model
from multifusion.model.card import load_model, save_model


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def scored_model(tmp_path, make_config) -> Path:
    """A small MultiFusion saved with a kNN unknown score (bank: random images) and a val curve."""
    cfg = make_config({"hnf.layers": 1, "hnf.dim": 16, "hnf.stem_width": 32, "hnf.stem_depth": 2, "data.image_size": 32, "fusion.text": False})
    torch.manual_seed(0)
    model = build_model(cfg, CLASSES, None).eval()
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 255, (24, 32, 32), dtype=np.uint8), rng.integers(0, 255, (12, 32, 32), dtype=np.uint8)
    tr = screen_outputs(model, train, 8, "cpu", TEMPERATURE, tta=False)
    va = screen_outputs(model, val, 8, "cpu", TEMPERATURE, tta=True)
    fitted = fit_unknown("knn", 0.9, torch.from_numpy(tr.features), torch.from_numpy(rng.integers(0, 3, 24)), 3,
                         torch.from_numpy(va.logits), torch.from_numpy(va.features), TEMPERATURE, knn_k=3)
    out = tmp_path / "model"
    out.mkdir()
    entry = save_unknown_tensors(out, fitted)
    save_model(out, model, cfg, CLASSES, None, TEMPERATURE, "hnf", unknown=entry)
    return out


def set_entry(model_dir: Path, **changes) -> None:
    card_path = model_dir / "config.json"
    card = json.loads(card_path.read_text())
    card["unknown"] |= changes
    card_path.write_text(json.dumps(card))


def run(model_dir: Path, inputs, out: Path, **kw) -> pd.DataFrame:
    options = dict(top_k=2, uncertain_threshold=0.5, batch_size=2, progress=False) | kw
    predict_paths(model_dir, inputs, out, **options)
    return pd.read_csv(out, dtype=str, keep_default_na=False)


def test_ood_score_is_the_knn_distance_and_unknown_its_threshold(scored_model, folder, tmp_path):  # noqa: F811
    table = run(scored_model, [folder], tmp_path / "p.csv")
    assert list(table.columns[-5:]) == ["uncertain", "ood_score", "unknown", "abstained", "error"]
    ok, bad = table[table["status"] == "ok"], table[table["status"] == "error"]
    assert len(ok) == len(GOOD) and len(bad) == len(BAD)
    assert (bad["unknown"] == "").all() and (bad["ood_score"] == "").all() and (bad["error"] != "").all()  # never `unknown`
    # the reference: the same preprocessing, the identity view's features, the bank in the tensors file
    loaded = load_model(scored_model)
    images = np.stack([read_one(Path(p), loaded.input)[0] for p in ok["path"]])
    feats = screen_outputs(loaded.model, images, 2, "cpu", TEMPERATURE, tta=False).features
    from safetensors.torch import load_file

    bank = load_file(str(scored_model / "unknown.safetensors"))["bank"]
    expected = knn_score(torch.from_numpy(feats), bank, 3).numpy()
    np.testing.assert_allclose(ok["ood_score"].astype(float), expected, rtol=1e-5, atol=1e-6)
    # the threshold between the scores: the rows above it, and only those, are unknown
    threshold = float(np.median(expected))
    set_entry(scored_model, threshold=threshold)
    table = run(scored_model, [folder], tmp_path / "p2.csv")
    ok = table[table["status"] == "ok"]
    assert list(ok["unknown"] == "True") == list(ok["ood_score"].astype(float) > threshold)
    assert 0 < (ok["unknown"] == "True").sum() < len(ok)
    assert (table.loc[table["status"] == "error", "unknown"] == "").all()


@pytest.mark.parametrize("legacy", [False, True])
def test_knn_spectrum_scores_with_the_profile_bands_its_card_records(tmp_path, make_config, folder, legacy):  # noqa: F811
    """predict computes the texture profiles at the fitted score's bands: 32 and the larger term
    today; a card fitted before recorded neither and keeps its 16-band sum."""
    cfg = make_config({"hnf.layers": 1, "hnf.dim": 16, "hnf.stem_width": 32, "hnf.stem_depth": 2, "data.image_size": 32, "fusion.text": False})
    torch.manual_seed(0)
    model = build_model(cfg, CLASSES, None).eval()
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 255, (24, 32, 32), dtype=np.uint8), rng.integers(0, 255, (12, 32, 32), dtype=np.uint8)
    bands = 16 if legacy else spectrum.BANDS
    tr = screen_outputs(model, train, 8, "cpu", TEMPERATURE, False, spectrum_bands=bands)
    va = screen_outputs(model, val, 8, "cpu", TEMPERATURE, True, spectrum_bands=bands)
    fitted = fit_unknown("knn_spectrum", 0.9, torch.from_numpy(tr.features), torch.from_numpy(rng.integers(0, 3, 24)), 3,
                         torch.from_numpy(va.logits), torch.from_numpy(va.features), TEMPERATURE, 3,
                         torch.from_numpy(tr.spectra), torch.from_numpy(va.spectra))
    out = tmp_path / "model"
    out.mkdir()
    entry = save_unknown_tensors(out, fitted)
    assert entry["bands"] == bands
    if legacy:
        entry = {k: v for k, v in entry.items() if k not in ("bands", "combine")}
    save_model(out, model, cfg, CLASSES, None, TEMPERATURE, "hnf", unknown=entry)
    ok = run(out, [folder], tmp_path / "p.csv").query("status == 'ok'")
    loaded = load_model(out)
    images = np.stack([read_one(Path(p), loaded.input)[0] for p in ok["path"]])
    got = screen_outputs(loaded.model, images, 2, "cpu", TEMPERATURE, False, spectrum_bands=bands)
    feature_term = knn_score(torch.from_numpy(got.features), fitted.tensors["bank"], 3).numpy() / fitted.scales[0]
    profile_term = kth_distance(torch.from_numpy(got.spectra), fitted.tensors["spectrum_bank"], 3).numpy() / fitted.scales[1]
    expected = feature_term + profile_term if legacy else np.maximum(feature_term, profile_term)
    np.testing.assert_allclose(ok["ood_score"].astype(float), expected, rtol=1e-5, atol=1e-6)


def test_target_accuracy_abstains_below_the_val_curve_and_keeps_every_row(scored_model, folder, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="no val risk-coverage curve"):
        run(scored_model, [folder], tmp_path / "p.csv", target_accuracy=0.99)
    plain = run(scored_model, [folder], tmp_path / "p0.csv")
    probs = np.sort(plain.loc[plain["status"] == "ok", "top1_prob"].astype(float).to_numpy())
    cut = float((probs[0] + probs[-1]) / 2) if probs[0] < probs[-1] else float(probs[0])
    # a val curve: right on every image at or above `cut`, wrong on half below it
    conf = np.r_[np.full(50, cut), np.full(10, cut / 2)]
    curve = risk_coverage(conf, np.r_[np.ones(50, bool), np.arange(10) % 2 == 0])
    set_entry(scored_model, selective=curve.record())
    table = run(scored_model, [folder], tmp_path / "p.csv", target_accuracy=0.99)
    assert len(table) == len(GOOD) + len(BAD)  # abstained rows stay
    ok = table[table["status"] == "ok"]
    assert list(ok["abstained"] == "True") == list(ok["top1_prob"].astype(float) < cut)
    assert (table.loc[table["status"] == "error", "abstained"] == "").all()
    set_entry(scored_model, selective=risk_coverage(conf, np.zeros(60, bool)).record())  # val never right: abstain on all
    everything = run(scored_model, [folder], tmp_path / "p1.csv", target_accuracy=0.5)
    assert (everything.loc[everything["status"] == "ok", "abstained"] == "True").all()
    with pytest.raises(ValueError, match="--target-accuracy"):
        run(scored_model, [folder], tmp_path / "p.csv", target_accuracy=1.5)


@pytest.mark.parametrize("first", [1, 2, 4])
def test_adaptive_views_take_the_first_views_where_certain_and_all_eight_elsewhere(scored_model, first):
    loaded = load_model(scored_model)
    images = np.random.default_rng(1).integers(0, 255, (6, 32, 32), dtype=np.uint8)
    full = predict_logits(loaded.model, images, 3, "cpu", tta=True)  # evaluate's 8-view average: the reference
    x = to_model_input(images)
    with torch.no_grad():
        each = torch.stack([loaded.model(v) for v in dihedral_views(x)]).numpy()  # (8, N, K), one plain pass per view
    opening = each[list(VIEW_ORDER[:first])].mean(axis=0)  # (N, K)
    assert VIEW_ORDER[:2] == (0, 4)  # the identity, then its 180-degree turn
    np.testing.assert_allclose(screen_outputs(loaded.model, images, 3, "cpu", TEMPERATURE, True).logits, full, rtol=1e-5, atol=1e-6)
    top1 = torch.softmax(torch.from_numpy(opening) / TEMPERATURE, 1).max(1).values.numpy()
    cut = float(np.median(top1))
    out = screen_outputs(loaded.model, images, 3, "cpu", TEMPERATURE, True, ViewPolicy(first, cut))
    certain = top1 > cut
    assert certain.any() and not certain.all()
    assert list(out.views) == [first if c else 8 for c in certain]
    np.testing.assert_allclose(out.logits[certain], opening[certain], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.logits[~certain], full[~certain], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.features, screen_outputs(loaded.model, images, 3, "cpu", TEMPERATURE, False).features,
                               rtol=1e-5, atol=1e-6)  # always the identity view's


@pytest.mark.parametrize("first, confidence", [(0, 0.9), (9, 0.9), (2, 0.0), (2, 1.5)])
def test_a_view_policy_out_of_range_is_refused_in_one_line(first, confidence):
    with pytest.raises(ValueError, match=r"predict\.(first_views|view_confidence) must be"):
        ViewPolicy(first, confidence)


def test_precision_auto_is_bf16_where_the_device_has_it_and_bf16_runs_under_autocast(scored_model, monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not ViewPolicy().bf16_on(cpu) and not ViewPolicy(precision="fp32").bf16_on(cuda)
    assert ViewPolicy(precision="bf16").bf16_on(cpu) and ViewPolicy(precision="auto").bf16_on(cuda)
    for native in (True, False):
        monkeypatch.setattr("multifusion.inference.views.native_cpu_bf16", lambda native=native: native)
        assert ViewPolicy(precision="auto").bf16_on(cpu) is native
    with pytest.raises(ValueError, match=r"predict\.precision must be one of auto, fp32, bf16, got 'fp16'"):
        ViewPolicy(2, 0.9, "fp16")
    loaded = load_model(scored_model)
    images = np.random.default_rng(3).integers(0, 255, (6, 32, 32), dtype=np.uint8)
    fp32 = screen_outputs(loaded.model, images, 3, "cpu", TEMPERATURE, True)
    bf16 = screen_outputs(loaded.model, images, 3, "cpu", TEMPERATURE, True, ViewPolicy(precision="bf16"))
    assert not np.array_equal(bf16.logits, fp32.logits)  # the autocast took effect ...
    np.testing.assert_allclose(bf16.logits, fp32.logits, atol=0.1 * np.abs(fp32.logits).max())  # ... at bf16's precision
    assert bf16.logits.dtype == np.float32 and bf16.features.dtype == np.float32


def test_predict_precision_is_a_checked_param_and_a_cli_option(tmp_path, scored_model, folder):  # noqa: F811
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["predict"]["precision"] = "half"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"predict\.precision"):
        load_config(tmp_path / "params.yaml")
    from typer.testing import CliRunner

    from multifusion.cli import app

    bad = CliRunner().invoke(app, ["predict", "--model", str(scored_model), str(folder), "--out", str(tmp_path / "p.csv"),
                                   "--params", str(ROOT / "params.yaml"), "--precision", "fp16"])
    assert bad.exit_code != 0 and "predict.precision must be one of auto, fp32, bf16" in bad.output
    assert not (tmp_path / "p.csv").exists()
    ok = CliRunner().invoke(app, ["predict", "--model", str(scored_model), str(folder), "--out", str(tmp_path / "p.csv"),
                                  "--params", str(ROOT / "params.yaml"), "--precision", "fp32"])
    assert ok.exit_code == 0, ok.output
    assert (pd.read_csv(tmp_path / "p.csv")["status"] == "ok").sum() == len(GOOD)


def test_the_former_single_view_key_names_its_replacement(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["predict"]["single_view_confidence"] = params["predict"].pop("view_confidence")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"'predict\.single_view_confidence' is now 'predict\.view_confidence'"):
        load_config(tmp_path / "params.yaml")


ROW = re.compile(r'<tr class="([^"]*)" data-i="(\d+)" data-status="(\w+)"[^>]*data-unknown="(\d)"')


def test_report_shows_filters_unknown_rows_and_warns_of_drift(scored_model, folder, tmp_path):  # noqa: F811
    plain = run(scored_model, [folder], tmp_path / "p0.csv")
    scores = np.sort(plain.loc[plain["status"] == "ok", "ood_score"].astype(float).to_numpy())
    set_entry(scored_model, threshold=float(scores[0] + scores[1]) / 2, val_unknown_fraction=0.0, n_val=1000)  # 2 of 3 unknown
    report = tmp_path / "report.html"
    table = run(scored_model, [folder], tmp_path / "p.csv", report=report, drift_p=0.01)
    unknown_rows = [str(i) for i in table.index[table["unknown"] == "True"]]
    assert len(unknown_rows) == 2
    page = report.read_text()
    rows = ROW.findall(page)
    assert [u for *_, u in rows] == ["1" if x == "True" else "0" for x in table["unknown"]]
    assert all(cls == "unknown" for cls, _, _, u in rows if u == "1")
    assert "2 of 3 unknown" in page and 'id="drift"' in page  # 2 of 3 where val predicts ~0: binomial p ~ 3e-6
    dom = browse(report, "?unknown=1", tmp_path, "--dump-dom")
    assert body_attrs(dom)["order"] == ",".join(unknown_rows)  # only the unknown rows shown
    assert 'id="drift"' in dom
    # a batch as unknown as val predicts: no warning
    set_entry(scored_model, val_unknown_fraction=0.6)
    run(scored_model, [folder], tmp_path / "p2.csv", report=tmp_path / "calm.html", drift_p=0.01)
    calm = (tmp_path / "calm.html").read_text()
    assert "2 of 3 unknown" in calm and 'id="drift"' not in calm


def test_margin_terms_sum_to_the_logit_margin_and_flatness(make_config):
    from multifusion.inference.call_terms import attention_flatness, margin_terms
    from multifusion.text.features import random_text_features

    cfg = make_config({"hnf.layers": 2, "hnf.dim": 16, "data.image_size": 32, "fusion.text": True, "fusion.mode": "mha"})
    torch.manual_seed(0)
    text = random_text_features(CLASSES, ["morphology", "distinguish"], length=4, dim=cfg.text.hidden)
    model = build_model(cfg, CLASSES, text).eval()
    images = np.random.default_rng(2).integers(0, 255, (5, 32, 32), dtype=np.uint8)
    logits = predict_logits(model, images, 5, "cpu")  # (5, 3)
    calls = logits.argmax(1)
    parts = margin_terms(model, images, calls, "cpu")
    runner = np.argsort(-logits, 1)[:, 1]
    assert list(parts.runner_up) == list(runner)
    np.testing.assert_allclose(parts.margin, logits[np.arange(5), calls] - logits[np.arange(5), runner], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(parts.terms.sum(1), parts.margin, rtol=1e-5, atol=1e-6)
    assert margin_terms(build_model(make_config({"hnf.layers": 1, "hnf.dim": 16, "data.image_size": 32, "fusion.text": False}),
                                    CLASSES, None), images, calls) is None
    np.testing.assert_allclose(attention_flatness(np.array([[0.25] * 4, [1.0, 0, 0, 0]])), [1.0, 0.0], atol=1e-9)


def test_margin_terms_follow_the_views_of_the_call(make_config):
    from multifusion.inference.call_terms import margin_terms
    from multifusion.text.features import random_text_features

    # the conv stem: the graph trunk's kNN can pick another neighbour at a near-tie when the batch
    # around an image changes (measured: 0.017 on a logit of an untrained model), which is not what this checks
    cfg = make_config({"hnf.layers": 2, "hnf.dim": 16, "data.image_size": 32, "fusion.text": True, "fusion.mode": "mha",
                       "hnf.stem": "conv"})
    torch.manual_seed(1)
    text = random_text_features(CLASSES, ["morphology", "distinguish"], length=4, dim=cfg.text.hidden)
    model = build_model(cfg, CLASSES, text).eval()
    images = np.random.default_rng(3).integers(0, 255, (4, 32, 32), dtype=np.uint8)
    views = np.array([8, 1, 2, 2])
    out = screen_outputs(model, images, 4, "cpu", 1.0, True)  # all eight: the averaged logits
    one = predict_logits(model, images, 4, "cpu")
    two = screen_outputs(model, images, 4, "cpu", 1.0, True, ViewPolicy(2, 1e-9)).logits  # the identity and its 180-degree turn
    logits = np.select([views[:, None] == 8, views[:, None] == 2], [out.logits, two], one)  # what an adaptive call averaged
    calls = logits.argmax(1)
    parts = margin_terms(model, images, calls, "cpu", views)
    runner = np.argsort(-logits, 1)[:, 1]
    np.testing.assert_allclose(parts.margin, logits[np.arange(4), calls] - logits[np.arange(4), runner], rtol=1e-4, atol=1e-5)
    assert (parts.margin >= 0).all()  # the call is the top of the logits its terms come from


def test_train_fits_and_saves_the_unknown_score_with_the_model(make_config, make_prepared, tmp_path):
    from multifusion.data.dataset import load_prepared
    from multifusion.evaluation.ood import load_unknown
    from multifusion.training.train import fit

    prepared = make_prepared(per_class={"train": 8, "val": 7, "test": 2})
    cfg = make_config({"data.image_size": 16, "hnf.stem": "conv", "hnf.layers": 1, "hnf.dim": 16, "fusion.text": False,
                       "train.batch_size": 8, "train.epochs": 1, "ood.score": "mahalanobis", "ood.keep_rate": 0.9,
                       "predict.precision": "fp32"})  # fp32: the keep rate below is checked to float noise
    torch.manual_seed(0)
    classes = load_prepared(prepared).classes
    fit(build_model(cfg, classes, None), cfg, prepared, tmp_path / "model", tmp_path / "ck", tmp_path / "live", "hnf")
    loaded = load_model(tmp_path / "model")
    entry = loaded.unknown
    assert entry["score"] == "mahalanobis" and entry["keep_rate"] == 0.9 and entry["n_val"] == 21
    assert entry["tensors"]["shapes"] == {"means": [3, 32], "precision": [32, 32]}  # (1 HNF layer + the global token) x 16
    assert entry["views"] == {"tta": cfg.evaluate.tta, "first_views": cfg.predict.first_views, "view_confidence": cfg.predict.view_confidence,
                              "precision": "fp32", "bf16": False}
    assert entry["selective"]["n"] == 21 and entry["selective"]["coverage"][-1] == 1.0
    fitted = load_unknown(tmp_path / "model", entry)
    data = load_prepared(prepared)
    val = np.asarray(data.images[data.split_indices("val")])
    # another batch size than train's: float noise of ~1e-6, which the midway threshold absorbs
    out = screen_outputs(loaded.model, val, 8, "cpu", loaded.temperature, cfg.evaluate.tta,
                         ViewPolicy.of(cfg.predict))
    kept = (~fitted.flags(fitted(out.logits, out.features))).mean()
    assert kept >= 0.9 and 1 - kept == pytest.approx(entry["val_unknown_fraction"])  # the documented keep rate on val
