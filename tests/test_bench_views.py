"""bench/adaptive_views.py: the cheaper view policies it scores, against a direct computation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).parents[1] / "bench"
spec = importlib.util.spec_from_file_location("adaptive_views", BENCH / "adaptive_views.py")
adaptive_views = importlib.util.module_from_spec(spec)
spec.loader.exec_module(adaptive_views)


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
