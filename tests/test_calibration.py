"""Temperature scaling: finds the NLL minimum, keeps the argmax, lowers NLL and ECE on
over-confident logits, and is saved with a trained model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from multifusion.evaluation.calibration import fit_temperature, nll
from multifusion.evaluation.evaluate import expected_calibration_error, softmax


def overconfident(n: int = 600, c: int = 5, scale: float = 4.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a calibrated model (labels drawn from softmax(z)), then multiplied by ``scale``."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * 1.5
    p = softmax(z)
    labels = np.array([rng.choice(c, p=row) for row in p])
    return z * scale, labels


def test_recovers_the_inflation_and_minimises_nll():
    logits, labels = overconfident(scale=4.0)
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(4.0, rel=0.2)
    grid = np.linspace(2.0, 6.0, 161)
    best_on_grid = grid[np.argmin([nll(logits, labels, g) for g in grid])]
    assert t == pytest.approx(best_on_grid, abs=0.05)
    # the gradient of NLL with respect to T vanishes at the fitted T (PyTorch autograd as oracle)
    T = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.cross_entropy(torch.tensor(logits) / T, torch.tensor(labels)).backward()
    assert abs(float(T.grad)) < 1e-4


@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0])
def test_keeps_argmax_and_lowers_validation_nll(scale):
    val_logits, val_labels = overconfident(scale=scale, seed=1)
    t = fit_temperature(val_logits, val_labels)
    assert np.array_equal(softmax(val_logits, t).argmax(1), val_logits.argmax(1))
    assert nll(val_logits, val_labels, t) <= nll(val_logits, val_labels, 1.0) + 1e-12
    if scale != 1.0:
        assert nll(val_logits, val_labels, t) < nll(val_logits, val_labels, 1.0) - 1e-3
    # fitted on validation, it also helps held-out data from the same model
    test_logits, test_labels = overconfident(scale=scale, seed=2)
    if scale == 4.0:
        assert nll(test_logits, test_labels, t) < nll(test_logits, test_labels, 1.0)
        assert expected_calibration_error(softmax(test_logits, t), test_labels, 15) < expected_calibration_error(
            softmax(test_logits), test_labels, 15
        )


def test_edge_cases():
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 1.0
    with pytest.raises(ValueError, match="logits"):
        fit_temperature(np.zeros((4,)), np.zeros(4, dtype=int))
    # perfectly separable: sharper is always better, no finite T is supported: T stays 1
    logits = np.eye(3)[[0, 1, 2, 0]] * 5.0
    assert fit_temperature(logits, np.array([0, 1, 2, 0])) == 1.0


def test_fit_saves_the_validation_temperature(make_prepared, make_config, tmp_path):
    from multifusion.data.dataset import load_prepared
    from multifusion.evaluation.evaluate import predict_logits
    from multifusion.training.train import fit

    prepared_dir = make_prepared(per_class={"train": 8, "val": 20, "test": 4})  # enough val images to support a fit
    cfg = make_config({"data.image_size": 16, "hnf.stem": "conv", "train.epochs": 2, "train.batch_size": 8})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 3))
    model.architecture = {"name": "linear", "args": {}}  # the card's record of this test-only model
    model = fit(model, cfg, prepared_dir, tmp_path / "m", tmp_path / "ck", tmp_path / "live", "linear")
    prepared = load_prepared(prepared_dir)
    val = prepared.split_indices("val")
    logits = predict_logits(model, prepared.images[val], 8, "cpu")
    saved = json.loads((tmp_path / "m/config.json").read_text())["temperature"]
    assert saved != 1.0 and saved == pytest.approx(fit_temperature(logits, prepared.labels(val)), rel=1e-6)


# -- where a temperature is not supported (issue 13) ----------------------------------------


def near_copies(n_groups: int, per_group: int, margin: float, seed: int, c: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits (N, C), labels (N,), groups (N,): ``per_group`` near-copies of each of ``n_groups``
    source micrographs, each classified with logit ``margin`` for its own class."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_groups) % c, per_group)
    logits = rng.normal(0, 0.3, (len(labels), c))
    logits[np.arange(len(labels)), labels] += margin
    return logits, labels, np.repeat(np.arange(n_groups), per_group)


def test_perfect_small_validation_keeps_t_at_1_where_a_plain_fit_collapses():
    from multifusion.evaluation.calibration import calibrate_temperature, fit_bounded

    val_logits, val_labels, groups = near_copies(5, 8, margin=4.0, seed=0)  # 5 source micrographs, all right
    unguarded = fit_bounded(torch.as_tensor(val_logits), torch.as_tensor(val_labels))
    assert unguarded < 0.2  # what a plain fit does: the NLL keeps falling as T -> 0
    fit = calibrate_temperature(val_logits, val_labels, groups)
    assert fit.temperature == 1.0 and not fit.fitted and "classified correctly" in fit.reason
    # new micrographs on which the model is wrong now and then: T = 1 is far better than the collapsed T
    rng = np.random.default_rng(1)
    test_labels = rng.integers(0, 4, 200)
    test_logits = rng.normal(0, 1.5, (200, 4))
    test_logits[np.arange(200), test_labels] += 1.0
    assert 0.3 < (test_logits.argmax(1) == test_labels).mean() < 0.9
    assert nll(test_logits, test_labels, 1.0) < nll(test_logits, test_labels, unguarded) / 3


def test_one_error_in_few_groups_is_cross_validated_away():
    from multifusion.evaluation.calibration import calibrate_temperature

    logits, labels, groups = near_copies(6, 6, margin=5.0, seed=2)
    logits[0, labels[0]] -= 8.0  # one confident mistake in group 0
    fit = calibrate_temperature(logits, labels, groups)
    assert not fit.fitted and fit.temperature == 1.0 and fit.groups == 6
    assert fit.candidate < 1.0 and fit.cv_nll >= fit.cv_nll_uncalibrated and "held-out NLL" in fit.reason
    few = calibrate_temperature(logits[:12], labels[:12], groups[:12])  # 2 groups: nothing to cross-validate
    assert not few.fitted and "fewer than 3" in few.reason


def test_supported_fit_is_used_and_recorded():
    from multifusion.evaluation.calibration import calibrate_temperature, calibration_summary

    logits, labels = overconfident(scale=3.0, seed=3)
    fit = calibrate_temperature(logits, labels)
    assert fit.fitted and fit.temperature == pytest.approx(3.0, rel=0.25) and fit.cv_nll < fit.cv_nll_uncalibrated
    assert fit.temperature == fit_temperature(logits, labels)
    summary = calibration_summary(fit.to_dict())
    assert summary == {"temperature_fitted": True, "temperature_reason": fit.reason}
    assert calibration_summary(None)["temperature_fitted"] is None


@pytest.mark.parametrize("scale", [0.05, 0.5, 2.0, 30.0])
def test_bounded_fit_matches_scipy(scale):
    from scipy.optimize import minimize_scalar

    from multifusion.evaluation.calibration import T_MAX, T_MIN, fit_bounded

    logits, labels = overconfident(n=300, scale=scale, seed=4)
    ours = fit_bounded(torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels))
    ref = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))), bounds=(np.log(T_MIN), np.log(T_MAX)),
                          method="bounded", options={"xatol": 1e-10})
    assert T_MIN <= ours <= T_MAX
    assert nll(logits, labels, ours) <= nll(logits, labels, float(np.exp(ref.x))) + 1e-9
    assert ours == pytest.approx(float(np.exp(ref.x)), rel=1e-3)
