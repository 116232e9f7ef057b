"""Bench helpers (adaptive_views, robustness_pair, standardize_probe) against direct computations."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).parents[1] / "bench"


def load_bench(name: str):
    """The bench script ``bench/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


adaptive_views = load_bench("adaptive_views")


def test_cheaper_policies_average_the_right_views_on_the_uncertain_images_only():
    gen = torch.Generator().manual_seed(0)
    views = (torch.randn(8, 40, 5, generator=gen) * 2).numpy()  # (8, N, K)
    temperature, threshold = 0.8, 0.7
    top1 = torch.softmax(torch.from_numpy(views[0]) / temperature, dim=1).max(dim=1).values.numpy()
    uncertain = top1 <= threshold
    assert 0 < uncertain.sum() < 40  # the constructed case has both kinds
    policies = adaptive_views.cheaper_policies(views, temperature, threshold)
    logits, passes = policies["4 rotations"]
    np.testing.assert_allclose(logits[uncertain], views[[0, 2, 4, 6]][:, uncertain].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(logits[~uncertain], views[0][~uncertain])
    assert passes == 1 + 3 * uncertain.mean()
    # the cascade: at threshold 1 every image is uncertain twice over, so it is the eight-view mean
    everything, passes = adaptive_views.cheaper_policies(views, temperature, 1.0)["cascade 2 then 8"]
    np.testing.assert_allclose(everything, views.mean(0), rtol=1e-6)
    assert passes == 8
    # and at threshold 0 it is the identity view alone
    nothing, passes = adaptive_views.cheaper_policies(views, temperature, 0.0)["cascade 2 then 8"]
    np.testing.assert_array_equal(nothing, views[0])
    assert passes == 1


def test_robustness_pair_counts_the_images_each_run_alone_gets_right():
    robustness_pair = load_bench("robustness_pair")

    labels = [0, 1, 2, 0, 1, 2]

    def run(clean: list[int], shifted: list[int]) -> dict:
        return {"labels": labels, "clean": {"accuracy": np.mean(np.equal(clean, labels)), "predictions": clean},
                "shifts": {"info_bar": {"0.08": {"severity": 0.08, "level": 1, "accuracy": np.mean(np.equal(shifted, labels)),
                                                 "predictions": shifted}}}}

    a = run([0, 1, 2, 0, 1, 2], [0, 0, 0, 0, 1, 2])  # shifted: 4 right
    b = run([0, 1, 2, 0, 1, 0], [0, 1, 2, 1, 1, 2])  # shifted: 5 right; images 1, 2 only here, 3 only in a
    rows = robustness_pair.pair_rows(a, b)
    assert [r[0] for r in rows] == ["clean (1 view)", "info_bar 1 (0.08)"]
    clean, shifted = rows
    assert clean[1:5] == (1.0, 5 / 6, 1, 0)
    assert shifted[1:5] == (4 / 6, 5 / 6, 1, 2) and shifted[5] == 1.0  # exact McNemar of 1 / 2
    b["labels"] = [1] * 6
    try:
        robustness_pair.pair_rows(a, b)
    except ValueError as exc:
        assert "different test images" in str(exc)
    else:
        raise AssertionError("runs of different test images were paired")


def test_standardize_probe_grey_stats_are_each_images_statistics():
    probe = load_bench("standardize_probe")
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32), dtype=np.uint8)
    stats = probe.grey_stats(images)
    flat = images.reshape(6, -1).astype(float)
    np.testing.assert_allclose(stats, np.stack([flat.mean(1), flat.std(1), np.percentile(flat, 5, axis=1),
                                                np.percentile(flat, 95, axis=1)], axis=1))


def test_robustness_models_summary_is_the_mean_over_seeds_and_shift_levels():
    bench = load_bench("robustness_models")

    def result(clean: float, noise: list[float], blur: list[float]) -> dict:
        shifts = {name: {str(level): {"severity": level, "level": level, "accuracy": a} for level, a in enumerate(accs, 1)}
                  for name, accs in (("noise", noise), ("blur", blur))}
        return {"clean": {"accuracy": clean}, "shifts": shifts}

    runs = {42: result(0.9, [0.5, 0.3], [0.2]), 43: result(0.7, [0.1, 0.1], [0.4])}
    clean, shifted = bench.clean_and_shifted(runs)
    np.testing.assert_allclose([clean, shifted], [0.8, np.mean([np.mean([0.5, 0.3, 0.2]), np.mean([0.1, 0.1, 0.4])])])


def test_the_bench_view_policy_scores_what_predict_computes():
    """adaptive_views.policy on the eight views' logits gives the logits predict's screen_outputs
    computes under ViewPolicy(first, threshold), for one and two first views."""
    from multifusion.inference.views import ViewPolicy, screen_outputs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2), torch.nn.GELU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 7 * 7, 3)).eval()
    images = np.random.default_rng(0).integers(0, 255, (12, 16, 16), dtype=np.uint8)
    views = adaptive_views.view_logits(model, images, 5)  # (8, N, K)
    for first in (1, 2):
        opening = views[[0, 4][:first]].mean(0)
        top1 = torch.softmax(torch.from_numpy(opening) / 0.5, dim=1).max(dim=1).values.numpy()
        threshold = float(np.median(top1))
        logits, more = adaptive_views.policy(views, 0.5, threshold, first)
        assert 0 < more.sum() < len(images)
        out = screen_outputs(model, images, 5, "cpu", 0.5, True, ViewPolicy(first, threshold))
        np.testing.assert_allclose(out.logits, logits, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out.views == 8, more)
