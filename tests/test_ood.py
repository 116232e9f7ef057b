"""The unknown-material scores against references, the val threshold, the tensors file, the
drift test and selective prediction (risk-coverage, abstention)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from multifusion.evaluation import ood, spectrum
from multifusion.evaluation.selective import abstain_mask, aurc, risk_coverage, selective_metrics


def test_knn_score_matches_sklearn():
    gen = torch.Generator().manual_seed(0)
    train, test = torch.randn(300, 24, generator=gen), torch.randn(50, 24, generator=gen) * 2
    bank = ood.normalize_features(train)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    for k in (1, 5, 50):
        ours = ood.knn_score(test, bank, k, chunk=16).numpy()
        dist, _ = NearestNeighbors(n_neighbors=k).fit(unit(train.numpy().astype(np.float64))).kneighbors(unit(test.numpy().astype(np.float64)))
        np.testing.assert_allclose(ours, dist[:, k - 1], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="ood.knn_k"):
        ood.knn_score(test, bank, 301)


def test_mahalanobis_matches_numpy():
    rng = np.random.default_rng(1)
    K, D = 4, 6
    labels = rng.integers(0, K, 400)
    feats = rng.normal(size=(400, D)) @ rng.normal(size=(D, D)) + 3 * labels[:, None]
    test = rng.normal(size=(30, D)) * 3
    means, precision = ood.class_means_and_precision(torch.tensor(feats), torch.tensor(labels), K)
    ours = ood.mahalanobis_score(torch.tensor(test), means, precision).numpy()
    ref_means = np.stack([feats[labels == k].mean(0) for k in range(K)])
    centred = feats - ref_means[labels]
    ref_precision = np.linalg.pinv(centred.T @ centred / len(feats))
    ref = np.min([np.einsum("nd,de,ne->n", test - m, ref_precision, test - m) for m in ref_means], axis=0)
    np.testing.assert_allclose(ours, ref, rtol=1e-8)
    np.testing.assert_allclose(means.numpy(), ref_means, rtol=1e-10)


def test_energy_and_max_softmax_match_torch():
    logits = torch.randn(40, 7) * 4
    for t in (1.0, 1.7):
        np.testing.assert_allclose(ood.energy_score(logits, t).numpy(), (-t * torch.logsumexp(logits.double() / t, 1)).numpy())
        np.testing.assert_allclose(ood.max_softmax_score(logits, t).numpy(),
                                   (1 - torch.softmax(logits.double() / t, 1).max(1).values).numpy())
    confident, flat = torch.tensor([[20.0, 0, 0]]), torch.zeros(1, 3)
    assert ood.energy_score(confident) < ood.energy_score(flat)  # higher = more unknown, for every score


@pytest.mark.parametrize("n", [7, 20, 151])
@pytest.mark.parametrize("keep", [0.5, 0.9, 0.95, 1.0])
def test_threshold_keeps_the_documented_rate(n, keep):
    scores = np.random.default_rng(n).normal(size=n)
    t = ood.keep_threshold(scores, keep)
    kept = (scores <= t).mean()
    assert kept >= keep - 1e-12 and kept - 1.0 / n < keep  # at least keep_rate, and no image more than needed


def test_kth_distance_matches_sklearn():
    gen = torch.Generator().manual_seed(3)
    train, test = torch.randn(200, 16, generator=gen) * 3, torch.randn(40, 16, generator=gen) * 5
    for k in (1, 5):
        dist, _ = NearestNeighbors(n_neighbors=k).fit(train.double().numpy()).kneighbors(test.double().numpy())
        np.testing.assert_allclose(ood.kth_distance(test, train, k, chunk=7).numpy(), dist[:, k - 1], rtol=1e-9)


def numpy_radial_profile(image: np.ndarray, bands: int) -> np.ndarray:
    """The texture profile by hand: centred spectrum, radius in pixels of the shifted grid, per-band mean power."""
    x = image.astype(np.float64) - image.mean()
    power = np.abs(np.fft.fftshift(np.fft.fft2(x))) ** 2
    size = x.shape[0]
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot(yy - size // 2, xx - size // 2)
    band = np.minimum((radius / (size / 2) * bands).astype(int), bands - 1)
    profile = np.log(np.array([power[band == b].mean() for b in range(bands)]) + spectrum.FLOOR)
    return profile - profile.mean()


def test_radial_log_spectrum_matches_numpy_and_ignores_orientation_and_level():
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (5, 64, 64)).astype(np.uint8)
    images[1] = np.clip(128 + 60 * np.sin(np.arange(64) * 0.7)[None, :] + rng.normal(0, 5, (64, 64)), 40, 215)  # stripes
    ours = spectrum.radial_log_spectrum(images).numpy()
    assert ours.shape == (5, spectrum.BANDS)
    for image, row in zip(images, ours):
        np.testing.assert_allclose(row, numpy_radial_profile(image, spectrum.BANDS), rtol=1e-9, atol=1e-9)
    views = np.stack([np.rot90(images[1]), images[1][:, ::-1], images[1][::-1]])  # the test-time views
    np.testing.assert_allclose(spectrum.radial_log_spectrum(np.ascontiguousarray(views)).numpy(), np.repeat(ours[1:2], 3, 0), atol=1e-9)
    brighter = (images[1].astype(int) + 20).astype(np.uint8)  # 60..235: the same texture, a higher grey level
    np.testing.assert_allclose(spectrum.radial_log_spectrum(brighter[None]).numpy()[0], ours[1], atol=1e-9)
    assert np.abs(ours[1] - ours[0]).max() > 1.0  # stripes and white noise differ
    flat = spectrum.radial_log_spectrum(np.full((1, 8, 8), 77, np.uint8))
    assert torch.isfinite(flat).all()


def test_knn_spectrum_is_the_larger_of_both_distances_scaled_on_val(tmp_path):
    rng = np.random.default_rng(5)
    K, D, B = 3, 8, spectrum.BANDS
    train_labels = rng.integers(0, K, 150)
    train, val = rng.normal(size=(150, D)), rng.normal(size=(60, D))
    train_spectra, val_spectra = rng.normal(size=(150, B)), rng.normal(size=(60, B))
    logits = torch.tensor(rng.normal(size=(60, K)))
    fitted = ood.fit_unknown("knn_spectrum", 0.9, torch.tensor(train), torch.tensor(train_labels), K, logits, torch.tensor(val),
                             knn_k=4, train_spectra=torch.tensor(train_spectra), val_spectra=torch.tensor(val_spectra))
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    feature_d = NearestNeighbors(n_neighbors=4).fit(unit(train)).kneighbors(unit(val))[0][:, 3]
    profile_d = NearestNeighbors(n_neighbors=4).fit(train_spectra).kneighbors(val_spectra)[0][:, 3]
    scales = np.quantile(feature_d, 0.95), np.quantile(profile_d, 0.95)
    np.testing.assert_allclose(fitted.scales, scales, rtol=1e-5)
    larger = np.maximum(feature_d / scales[0], profile_d / scales[1])
    np.testing.assert_allclose(fitted(logits, val, val_spectra), larger, rtol=1e-5)
    assert (fitted.bands, fitted.combine) == (B, "max")
    with pytest.raises(ValueError, match="texture profiles"):
        fitted(logits, val)
    with pytest.raises(ValueError, match="16 bands against a bank of 32"):
        fitted(logits, val, val_spectra[:, :16])
    texture_far = val_spectra + 6.0  # known features, a texture no training image has
    assert fitted.flags(fitted(logits, val, texture_far)).all()
    # the card records bands and combination; a card fitted before recorded neither and keeps the 16-band sum
    entry = ood.save_unknown_tensors(tmp_path, fitted)
    assert ood.load_unknown(tmp_path, entry)(logits, val, val_spectra) == pytest.approx(larger, rel=1e-5)
    legacy = {k: v for k, v in entry.items() if k not in ("bands", "combine")}
    old = ood.load_unknown(tmp_path, legacy)
    assert (old.bands, old.combine) == (16, "sum")
    bank16 = old.tensors["spectrum_bank"][:, :16]
    old.tensors["spectrum_bank"] = bank16
    np.testing.assert_allclose(old(logits, val, val_spectra[:, :16]),
                               feature_d / scales[0] + NearestNeighbors(n_neighbors=4).fit(bank16.numpy()).kneighbors(
                                   val_spectra[:, :16])[0][:, 3] / scales[1], rtol=1e-5)
    with pytest.raises(ood.UnknownScoreError, match="combines by 'mean'"):
        ood.load_unknown(tmp_path, entry | {"combine": "mean"})


@pytest.mark.parametrize("score", ["knn_spectrum", "knn", "mahalanobis", "energy", "max_softmax"])
def test_fit_on_val_keeps_rate_and_round_trips(score, tmp_path):
    rng = np.random.default_rng(2)
    K, D = 3, 8
    train_labels = rng.integers(0, K, 200)
    centres = rng.normal(size=(K, D)) * 4
    train = centres[train_labels] + rng.normal(size=(200, D))
    val_labels = rng.integers(0, K, 100)
    val = centres[val_labels] + rng.normal(size=(100, D))
    val_logits = torch.tensor(-((val[:, None] - centres[None]) ** 2).sum(-1) / 40)  # no saturated (tied) softmax
    train_spectra, val_spectra = rng.normal(size=(200, 16)), rng.normal(size=(100, 16))  # texture profiles (knn_spectrum)
    fitted = ood.fit_unknown(score, 0.9, torch.tensor(train), torch.tensor(train_labels), K, val_logits, torch.tensor(val),
                             temperature=1.3, knn_k=3, train_spectra=torch.tensor(train_spectra), val_spectra=torch.tensor(val_spectra))
    val_scores = fitted(val_logits, val, val_spectra)
    assert (~fitted.flags(val_scores)).mean() == pytest.approx(0.9, abs=0.011)
    assert fitted.val_unknown_fraction == pytest.approx(0.1, abs=0.011)
    entry = ood.save_unknown_tensors(tmp_path, fitted)
    loaded = ood.load_unknown(tmp_path, entry)
    np.testing.assert_allclose(loaded(val_logits, val, val_spectra), val_scores)
    far = rng.normal(size=(20, D)) * 4 + 40  # far from every class
    far_logits = torch.tensor(-((far[:, None] - centres[None]) ** 2).sum(-1) / 4)
    if score in ood.FEATURE_SCORES:
        assert fitted.flags(fitted(far_logits, far, val_spectra[:20])).all()
        (tmp_path / ood.TENSORS).write_bytes(b"damaged")
        with pytest.raises(ood.UnknownScoreError, match="sha256"):
            ood.load_unknown(tmp_path, entry)
        (tmp_path / ood.TENSORS).unlink()
        with pytest.raises(ood.UnknownScoreError, match="missing"):
            ood.load_unknown(tmp_path, entry)


def test_drift_test():
    calm = ood.drift_test(200, 11, 0.05, 150, 0.01)
    assert not calm.alarm and calm.p_value > 0.3
    drifted = ood.drift_test(200, 40, 0.05, 150, 0.01)
    assert drifted.alarm and drifted.p_value < 1e-6
    assert not ood.drift_test(0, 0, 0.05, 150, 0.01).alarm


def test_risk_coverage_and_aurc():
    confidence = np.array([0.9, 0.8, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([1, 1, 0, 1, 0, 0], dtype=bool)
    curve = risk_coverage(confidence, correct)
    np.testing.assert_allclose(curve.coverage, [1 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])  # the tie at 0.8 kept together
    np.testing.assert_allclose(curve.accuracy, [1.0, 2 / 3, 3 / 4, 3 / 5, 1 / 2])
    assert curve.coverage_at(0.99) == pytest.approx(1 / 6) and curve.coverage_at(0.7) == pytest.approx(4 / 6)
    assert curve.threshold_for(0.7) == 0.7
    # AURC: mean over k of the risk of the k most confident (the tie's two rows at the group's risk)
    assert aurc(confidence, correct) == pytest.approx((0 + 1 / 3 + 1 / 3 + 1 / 4 + 2 / 5 + 1 / 2) / 6)
    assert selective_metrics(confidence, correct, [0.99])["coverage_at_0.99"] == pytest.approx(1 / 6)


def test_abstention_reaches_the_target_on_a_constructed_case():
    rng = np.random.default_rng(3)
    # a calibrated model: each call is right with probability equal to its confidence
    conf_val, conf_test = rng.uniform(0.5, 1.0, 4000), rng.uniform(0.5, 1.0, 4000)
    right_val, right_test = rng.random(4000) < conf_val, rng.random(4000) < conf_test
    curve = risk_coverage(conf_val, right_val)
    for target in (0.9, 0.95):
        abstain = abstain_mask(conf_test, curve, target)
        assert 0 < abstain.sum() < len(abstain)
        assert right_test[~abstain].mean() >= target - 0.01
        assert right_test.mean() < target  # without abstaining the target is missed
    assert abstain_mask(conf_test, curve, 1.01).all()  # unreachable: abstain on everything


def test_curve_files(tmp_path):
    from multifusion.evaluation.selective import plot_curve_png, write_curve_csv

    rng = np.random.default_rng(4)
    conf = rng.uniform(0.3, 1.0, 200)
    curve = risk_coverage(conf, rng.random(200) < conf)
    write_curve_csv(tmp_path / "rc.csv", curve)
    plot_curve_png(tmp_path / "rc.png", curve, [0.99, 0.95], "test")
    lines = (tmp_path / "rc.csv").read_text().splitlines()
    assert lines[0] == "coverage,risk,accuracy,threshold" and len(lines) == len(curve.coverage) + 1
    assert float(lines[-1].split(",")[0]) == 1.0
    assert (tmp_path / "rc.png").read_bytes()[:4] == b"\x89PNG"
