"""Temperature scaling: finds the NLL minimum, keeps the argmax, lowers NLL and ECE on
over-confident logits, and is saved with a trained model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from multifusion.calibration import fit_temperature, nll
from multifusion.evaluate import expected_calibration_error, softmax


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
    # perfectly separable: sharper is always better; T stays finite and positive
    logits = np.eye(3)[[0, 1, 2, 0]] * 5.0
    t = fit_temperature(logits, np.array([0, 1, 2, 0]))
    assert 0 < t <= 1.0 and np.isfinite(t)


def test_fit_saves_the_validation_temperature(make_prepared, make_config, tmp_path):
    from multifusion.data.dataset import load_prepared
    from multifusion.evaluate import predict_logits
    from multifusion.train import fit

    prepared_dir = make_prepared()
    cfg = make_config({"data.image_size": 16, "train.epochs": 2, "train.batch_size": 8})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 3))
    model = fit(model, cfg, prepared_dir, tmp_path / "m", tmp_path / "ck", tmp_path / "live", "linear")
    prepared = load_prepared(prepared_dir)
    val = prepared.split_indices("val")
    logits = predict_logits(model, prepared.images[val], 8, "cpu")
    saved = json.loads((tmp_path / "m/config.json").read_text())["temperature"]
    assert saved != 1.0 and saved == pytest.approx(fit_temperature(logits, prepared.labels(val)), rel=1e-6)
