"""Metrics (scikit-learn's, wrapped) against the hand-written formulas they replaced, the
confusion outputs, predict_probs, the save/load round trip (MultiFusion and a baseline) and
the evaluate stage end to end."""

from __future__ import annotations

import csv
import json
import runpy
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix

from multifusion.data.dataset import load_prepared, to_model_input
from multifusion.evaluation.evaluate import (
    classification_metrics,
    expected_calibration_error,
    macro_scores,
    per_class_table,
    plot_confusion_png,
    predict_probs,
    softmax,
    top_k_accuracy,
    write_confusion_csv,
)
from multifusion.core.json_files import write_json
from multifusion.model import build_model
from multifusion.model.card import load_model, save_model
from multifusion.text.features import TextFeatures, random_text_features


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


def previous_scores(labels: np.ndarray, preds: np.ndarray, c: int) -> dict[str, np.ndarray]:
    """evaluate.py's hand-written formulas before scikit-learn (issue 15): per class precision,
    recall, F1 (0 where undefined) from the confusion counts; ``present``: in labels or preds."""
    cm = np.bincount(labels * c + preds, minlength=c * c).reshape(c, c)          # rows actual, columns predicted
    tp, predicted, support = np.diag(cm).astype(float), cm.sum(0).astype(float), cm.sum(1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros(c), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(c), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(c), where=precision + recall > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support, "present": (support > 0) | (predicted > 0)}


def previous_top_k(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """The previous top-k: a stable sort, so tied scores rank the lower class index first."""
    top = np.argsort(-probs, axis=1, kind="stable")[:, : min(k, probs.shape[1])]
    return float((top == labels[:, None]).any(axis=1).mean())


def awkward_probs(n: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities with ties (scores on a coarse grid, some rows uniform), labels drawn from
    only part of the classes (the others absent from this split, some still predicted)."""
    rng = np.random.default_rng(seed)
    present = rng.choice(c, size=max(1, c - 2), replace=False)
    labels = rng.choice(present, n)
    scores = (np.round(rng.uniform(0, 1, (n, c)) * 4) + 1) / 4                   # (N, C), on a grid: ties
    scores[np.arange(n), labels] += rng.integers(0, 2, n) * 0.5
    scores[rng.random(n) < 0.1] = 1.0
    return scores / scores.sum(axis=1, keepdims=True), labels


CASES = [(200, 10, 0), (57, 4, 1), (30, 11, 2), (40, 3, 3), (25, 2, 4), (12, 6, 5)]


@pytest.mark.parametrize("n, c, seed", CASES)
@pytest.mark.parametrize("make", [random_probs, awkward_probs])
def test_metrics_give_the_previous_figures(n, c, seed, make):
    """Top-k, macro precision and recall bit for bit; F1 to the last bits (scikit-learn computes
    2tp / (2tp + fp + fn) with one rounding, the old formula 2PR / (P + R) from rounded P and R)."""
    probs, labels = make(n, c, seed)
    m = classification_metrics(probs, labels, ece_bins=15)
    for k in (1, 2, 3, 5):
        assert m[f"top{k}"] == top_k_accuracy(probs, labels, k) == previous_top_k(probs, labels, k), k
    assert m["top1"] == float((probs.argmax(1) == labels).mean())
    old = previous_scores(labels, probs.argmax(1), c)
    assert (m["macro_precision"], m["macro_recall"]) == (old["precision"][old["present"]].mean(), old["recall"][old["present"]].mean())
    assert m["macro_f1"] == pytest.approx(old["f1"][old["present"]].mean(), rel=1e-14, abs=1e-15)
    assert m["ece"] == pytest.approx(ece_reference(probs, labels, 15))
    assert set(m) == {"top1", "top2", "top3", "top5", "macro_precision", "macro_recall", "macro_f1", "ece"}
    table = per_class_table(probs, labels, [f"c{i}" for i in range(c)])
    for i, row in enumerate(table.values()):
        assert (row["precision"], row["recall"], row["support"]) == (old["precision"][i], old["recall"][i], old["support"][i])
        assert row["f1"] == pytest.approx(old["f1"][i], rel=1e-14, abs=1e-15)


def test_macro_scores_skip_classes_absent_from_labels_and_predictions():
    labels, preds = np.array([0, 0, 2, 2, 2]), np.array([0, 4, 2, 2, 0])   # 1, 3 absent; 4 only predicted
    precision, recall, f1 = macro_scores(labels, preds)
    assert precision == pytest.approx((1 / 2 + 1 + 0) / 3) and recall == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert f1 == pytest.approx((1 / 2 + 0.8 + 0) / 3)
    assert macro_scores(np.zeros(0, int), np.zeros(0, int)) == (0.0, 0.0, 0.0)


def test_top_k_ties_rank_the_lower_class_first():
    probs = np.array([[0.25, 0.25, 0.25, 0.25], [0.1, 0.3, 0.3, 0.3]])
    assert [top_k_accuracy(probs, np.array([1, 1]), k) for k in (1, 2, 3)] == [0.5, 1.0, 1.0]
    assert [top_k_accuracy(probs, np.array([3, 3]), k) for k in (1, 2, 3, 4)] == [0.0, 0.0, 0.5, 1.0]


def test_per_class_table_and_confusion_outputs(tmp_path):
    probs, labels = random_probs(120, 5, 3)
    preds = probs.argmax(1)
    classes = [f"c{i}" for i in range(5)]
    write_confusion_csv(tmp_path / "confusion.csv", labels, preds, classes)
    with (tmp_path / "confusion.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["actual"], r["predicted"]) for r in rows] == [(classes[a], classes[b]) for a, b in zip(labels, preds)]
    plot_confusion_png(tmp_path / "confusion.png", confusion_matrix(labels, preds, labels=range(5)), classes)
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_write_json_writes_the_bytes_of_the_previous_idiom(tmp_path):
    obj = {"top1": 0.1 + 0.2, "classes": ["Fibres", "Tips"], "nested": {"n": 3, "none": None}, "unicode": "µm"}
    path = write_json(tmp_path / "new" / "folder" / "m.json", obj)
    (tmp_path / "old.json").write_text(json.dumps(obj, indent=2) + "\n")
    assert path.read_bytes() == (tmp_path / "old.json").read_bytes()
    assert json.loads(path.read_text()) == obj


def test_perfect_and_degenerate_cases():
    labels = np.array([0, 1, 2, 2])
    onehot = np.eye(3)[labels]
    m = classification_metrics(onehot, labels, ece_bins=10)
    assert m["top1"] == m["macro_f1"] == 1.0 and m["ece"] == 0.0
    uniform = np.full((4, 3), 1 / 3)
    assert expected_calibration_error(uniform, labels, 10) == pytest.approx(abs(0.25 - 1 / 3))
    with pytest.raises(ValueError, match="probs"):
        classification_metrics(np.zeros((0, 3)), np.zeros(0, int), 10)


def tiny_text(seed: int = 0) -> TextFeatures:
    return random_text_features(["class_0", "class_1", "class_2"], length=5, dim=8, seed=seed)


TINY_HNF = {"data.image_size": 16, "hnf.stem": "conv", "hnf.layers": 2, "hnf.dim": 16, "hnf.heads": 2, "fusion.heads": 2, "graph.k": 4,
            "hnf.ode.solver": "euler", "hnf.ode.steps": 1}


def test_save_load_round_trip_multifusion(make_config, make_prepared, tmp_path):
    cfg = make_config(TINY_HNF)
    text = tiny_text()
    torch.manual_seed(0)
    model = build_model(cfg, ["class_0", "class_1", "class_2"], text).eval()
    images = load_prepared(make_prepared()).images[:6]
    save_model(tmp_path / "hnf", model, cfg, ["class_0", "class_1", "class_2"], text, 1.7, "hnf")
    loaded = load_model(tmp_path / "hnf")
    assert loaded.architecture["args"]["hnf"]["dim"] == cfg.hnf.dim and loaded.classes == ["class_0", "class_1", "class_2"]
    assert loaded.temperature == 1.7 and loaded.model_name == "hnf" and not loaded.model.training
    with torch.no_grad():
        assert torch.equal(model(to_model_input(images)), loaded.model(to_model_input(images)))
    np.testing.assert_array_equal(predict_probs(model, images, 4, "cpu", 1.7), predict_probs(loaded.model, images, 4, "cpu", 1.7))
    # the text features travel in the weights: a model built on other text of the same shape
    # answers differently until it loads the saved state dict
    other = build_model(cfg, ["class_0", "class_1", "class_2"], tiny_text(seed=1)).eval()
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
    """The stage's figures, recomputed here: the saved model's test-split logits under the
    test-time policy of params.yaml, then scikit-learn's top-k / P / R / F1 / log-loss and the
    reference ECE of softmax(logits / T) with the saved T (1.0 for the uncalibrated ones)."""
    from scipy.special import softmax as scipy_softmax
    from sklearn.metrics import log_loss, precision_recall_fscore_support, top_k_accuracy_score

    from multifusion.evaluation.evaluate import predict_logits

    cfg, classes = make_config(TINY_HNF), [f"class_{c}" for c in range(5)]
    prepared = make_prepared(classes=5)
    text = random_text_features(classes, length=5, dim=8)
    torch.manual_seed(0)
    model = build_model(cfg, classes, text).eval()
    save_model(tmp_path / "hnf", model, cfg, classes, text, 1.3, "hnf")
    metrics, per_class, plots = tmp_path / "metrics/eval.json", tmp_path / "metrics/per_class.json", tmp_path / "plots"
    cmd = [str(repo_root / "stages/evaluate.py"), "--model", str(tmp_path / "hnf"), "--prepared", str(prepared),
           "--metrics", str(metrics), "--per-class", str(per_class), "--plots", str(plots), "--params", str(repo_root / "params.yaml")]
    monkeypatch.setattr(sys, "argv", cmd)
    runpy.run_path(cmd[0], run_name="__main__")
    m = json.loads(metrics.read_text())

    data = load_prepared(prepared)
    test = data.split_indices("test")
    labels, logits = data.labels(test), predict_logits(model, data.images[test], 4, "cpu", cfg.evaluate.tta)  # (N,), (N, 5)
    probs, raw = scipy_softmax(logits.astype(np.float64) / 1.3, axis=1), scipy_softmax(logits.astype(np.float64), axis=1)
    p, r, f, _ = precision_recall_fscore_support(labels, probs.argmax(1), average="macro", zero_division=0)
    expected = {f"top{k}": top_k_accuracy_score(labels, probs, k=k, labels=np.arange(5)) for k in (1, 2, 3)}
    expected |= {"macro_precision": p, "macro_recall": r, "macro_f1": f, "n": len(test), "temperature": 1.3,
                 "ece": ece_reference(probs, labels, cfg.evaluate.ece_bins), "nll": log_loss(labels, probs, labels=np.arange(5)),
                 "ece_uncalibrated": ece_reference(raw, labels, cfg.evaluate.ece_bins),
                 "nll_uncalibrated": log_loss(labels, raw, labels=np.arange(5))}
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert m["nll"] != pytest.approx(m["nll_uncalibrated"], rel=1e-3)  # the temperature is applied, not only recorded
    assert m["temperature_fitted"] is None and m["temperature_reason"].startswith("not recorded")  # saved without a fit record
    assert set(json.loads(per_class.read_text())) == set(classes)
    rows = (plots / "confusion.csv").read_text().strip().splitlines()[1:]
    assert rows == [f"{classes[a]},{classes[b]}" for a, b in zip(labels, probs.argmax(1))]
    assert (plots / "confusion.png").is_file()


def test_test_time_policy_averages_the_eight_dihedral_views():
    """evaluate.tta: the logits are the mean over the 8 flips/rotations, checked against
    numpy's rot90/fliplr applied to the raw images (an orientation-sensitive linear model)."""
    from multifusion.data.dataset import to_model_input
    from multifusion.evaluation.evaluate import predict_logits

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
