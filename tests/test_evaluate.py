"""Metrics against scikit-learn, the confusion outputs, predict_probs, the save/load round
trip (MultiFusion and a baseline) and the evaluate stage end to end."""

from __future__ import annotations

import csv
import json
import runpy
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import precision_recall_fscore_support, top_k_accuracy_score

from multifusion.checkpoint import load_model, save_model
from multifusion.data.dataset import load_prepared, to_model_input
from multifusion.evaluate import (
    classification_metrics,
    confusion_matrix,
    expected_calibration_error,
    per_class_table,
    plot_confusion_png,
    predict_probs,
    softmax,
    write_confusion_csv,
)
from multifusion.model import build_model
from multifusion.text.features import TextFeatures


def random_probs(n: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) * 2
    logits[np.arange(n), labels] += rng.uniform(0, 3, n)     # better than chance, far from perfect
    return softmax(logits), labels


def ece_reference(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """Guo et al. (2017), eq. 3, written as a loop over bins (lo, hi]."""
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
    return total


@pytest.mark.parametrize("n, c, seed", [(200, 10, 0), (57, 4, 1), (30, 11, 2)])
def test_metrics_match_scikit_learn(n, c, seed):
    probs, labels = random_probs(n, c, seed)
    m = classification_metrics(probs, labels, ece_bins=15)
    for k in (1, 2, 3, 5):
        expected = top_k_accuracy_score(labels, probs, k=k, labels=np.arange(c)) if k < c else 1.0
        assert m[f"top{k}"] == pytest.approx(expected), k
    p, r, f, _ = precision_recall_fscore_support(labels, probs.argmax(1), average="macro", zero_division=0)
    assert (m["macro_precision"], m["macro_recall"], m["macro_f1"]) == pytest.approx((p, r, f))
    assert m["ece"] == pytest.approx(ece_reference(probs, labels, 15))
    assert set(m) == {"top1", "top2", "top3", "top5", "macro_precision", "macro_recall", "macro_f1", "ece"}


def test_per_class_table_and_confusion_match_scikit_learn(tmp_path):
    probs, labels = random_probs(120, 5, 3)
    preds = probs.argmax(1)
    classes = [f"c{i}" for i in range(5)]
    table = per_class_table(probs, labels, classes)
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=np.arange(5), zero_division=0)
    for i, name in enumerate(classes):
        assert (table[name]["precision"], table[name]["recall"], table[name]["f1"]) == pytest.approx((p[i], r[i], f[i]))
        assert table[name]["support"] == s[i]
    cm = confusion_matrix(labels, preds, 5)
    np.testing.assert_array_equal(cm, sk_confusion_matrix(labels, preds, labels=np.arange(5)))
    write_confusion_csv(tmp_path / "confusion.csv", labels, preds, classes)
    with (tmp_path / "confusion.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["actual"], r["predicted"]) for r in rows] == [(classes[a], classes[b]) for a, b in zip(labels, preds)]
    plot_confusion_png(tmp_path / "confusion.png", cm, classes)
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_perfect_and_degenerate_cases():
    labels = np.array([0, 1, 2, 2])
    onehot = np.eye(3)[labels]
    m = classification_metrics(onehot, labels, ece_bins=10)
    assert m["top1"] == m["macro_f1"] == 1.0 and m["ece"] == 0.0
    uniform = np.full((4, 3), 1 / 3)
    assert expected_calibration_error(uniform, labels, 10) == pytest.approx(abs(0.25 - 1 / 3))
    with pytest.raises(ValueError, match="probs"):
        classification_metrics(np.zeros((0, 3)), np.zeros(0, int), 10)


def tiny_text(classes: int = 3, templates: int = 2, length: int = 5, dim: int = 8, seed: int = 0) -> TextFeatures:
    T = classes * templates
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(T, length, dtype=torch.bool)
    mask[:, -2:] = False
    return TextFeatures(
        token_states=torch.randn(T, length, dim, generator=g),
        attention_mask=mask,
        sentence_embeddings=torch.randn(T, dim, generator=g),
        class_names=[f"class_{c}" for c in range(classes) for _ in range(templates)],
        templates=[f"t{t}" for _ in range(classes) for t in range(templates)],
        samples=[0] * T,
    )


TINY_HNF = {"data.image_size": 16, "hnf.stem": "conv", "hnf.layers": 2, "hnf.dim": 16, "hnf.heads": 2, "fusion.heads": 2, "graph.k": 4,
            "hnf.ode.solver": "euler", "hnf.ode.steps": 1}


def test_save_load_round_trip_multifusion(make_config, make_prepared, tmp_path):
    cfg = make_config(TINY_HNF)
    text = tiny_text()
    torch.manual_seed(0)
    model = build_model(cfg, 3, text).eval()
    images = load_prepared(make_prepared()).images[:6]
    save_model(tmp_path / "hnf", model, cfg, ["class_0", "class_1", "class_2"], text, 1.7, "hnf")
    loaded = load_model(tmp_path / "hnf")
    assert loaded.cfg == cfg and loaded.classes == ["class_0", "class_1", "class_2"]
    assert loaded.temperature == 1.7 and loaded.model_name == "hnf" and not loaded.model.training
    with torch.no_grad():
        assert torch.equal(model(to_model_input(images)), loaded.model(to_model_input(images)))
    np.testing.assert_array_equal(predict_probs(model, images, 4, "cpu", 1.7), predict_probs(loaded.model, images, 4, "cpu", 1.7))
    # the text features travel in the weights: a model built on other text of the same shape
    # answers differently until it loads the saved state dict
    other = build_model(cfg, 3, tiny_text(seed=1)).eval()
    other.load_state_dict({k: v for k, v in model.state_dict().items() if "text" not in k}, strict=False)
    with torch.no_grad():
        assert not torch.allclose(other(to_model_input(images)), model(to_model_input(images)))
        other.load_state_dict(loaded.model.state_dict())
        assert torch.equal(other(to_model_input(images)), model(to_model_input(images)))


def test_save_load_round_trip_baseline(make_config, tmp_path):
    from multifusion.model.baselines import build_baseline

    cfg = make_config({"data.image_size": 32})
    torch.manual_seed(0)
    model = build_baseline("resnet18", 4, 32).eval()
    save_model(tmp_path / "resnet18", model, cfg, list("abcd"), None, 1.0, "resnet18")
    loaded = load_model(tmp_path / "resnet18")
    assert type(loaded.model) is type(model)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))


def test_load_model_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json.*dvc repro train"):
        load_model(tmp_path)


def test_predict_probs_applies_temperature(make_prepared):
    images = load_prepared(make_prepared()).images[:5]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 3)).eval()
    with torch.no_grad():
        logits = model(to_model_input(images)).double()
    for t in (1.0, 2.5):
        np.testing.assert_allclose(predict_probs(model, images, 2, "cpu", t), torch.softmax(logits / t, 1).numpy(), rtol=1e-5)


def test_evaluate_stage_writes_metrics_and_plots(make_config, make_prepared, repo_root, tmp_path, monkeypatch):
    cfg = make_config(TINY_HNF)
    prepared = make_prepared()
    text = tiny_text()
    torch.manual_seed(0)
    save_model(tmp_path / "hnf", build_model(cfg, 3, text), cfg, ["class_0", "class_1", "class_2"], text, 1.3, "hnf")
    metrics, per_class, plots = tmp_path / "metrics/eval.json", tmp_path / "metrics/per_class.json", tmp_path / "plots"
    cmd = [str(repo_root / "stages/evaluate.py"), "--model", str(tmp_path / "hnf"), "--prepared", str(prepared),
           "--metrics", str(metrics), "--per-class", str(per_class), "--plots", str(plots), "--params", str(repo_root / "params.yaml")]
    monkeypatch.setattr(sys, "argv", cmd)
    runpy.run_path(cmd[0], run_name="__main__")
    m = json.loads(metrics.read_text())
    for key in ("top1", "top2", "top3", "top5", "macro_precision", "macro_recall", "macro_f1", "ece",
                "ece_uncalibrated", "nll", "nll_uncalibrated", "temperature"):
        assert np.isfinite(m[key]), key
    assert m["temperature"] == 1.3 and m["n"] == 12 and m["top3"] == 1.0
    assert m["temperature_fitted"] is None and m["temperature_reason"].startswith("not recorded")  # saved without a fit record
    assert set(json.loads(per_class.read_text())) == {"class_0", "class_1", "class_2"}
    assert len((plots / "confusion.csv").read_text().strip().splitlines()) == 13
    assert (plots / "confusion.png").is_file()


def test_test_time_policy_averages_the_eight_dihedral_views():
    """evaluate.tta: the logits are the mean over the 8 flips/rotations, checked against
    numpy's rot90/fliplr applied to the raw images (an orientation-sensitive linear model)."""
    from multifusion.data.dataset import to_model_input
    from multifusion.evaluate import predict_logits

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8 * 8, 3))
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8), dtype=np.uint8)
    views = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
    views += [np.flip(v, axis=2) for v in views]  # the 8 elements of the dihedral group
    with torch.no_grad():
        expected = np.mean([model(to_model_input(np.ascontiguousarray(v))).numpy() for v in views], axis=0)
    single = predict_logits(model, images, 2, "cpu", tta=False)
    np.testing.assert_allclose(predict_logits(model, images, 2, "cpu", tta=True), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(single, expected, atol=1e-3)  # the policy changes the answer
