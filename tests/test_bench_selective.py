"""bench/selective_scores.py: the confidences it ranks the 8-view calls by, against PyTorch."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).parents[1] / "bench"
sys.path.insert(0, str(BENCH))  # its `from adaptive_views import view_logits`
spec = importlib.util.spec_from_file_location("selective_scores", BENCH / "selective_scores.py")
selective_scores = importlib.util.module_from_spec(spec)
spec.loader.exec_module(selective_scores)


def test_confidences_match_torch_on_random_view_logits():
    gen = torch.Generator().manual_seed(0)
    views = torch.randn(8, 50, 6, generator=gen) * 3  # (8, N, K)
    temperature = 0.7
    calls, scores = selective_scores.confidences(views.numpy(), temperature)

    expected_calls = views.mean(0).argmax(1)  # (N,)
    assert np.array_equal(calls, expected_calls.numpy())
    probs = torch.softmax(views.mean(0) / temperature, dim=1)  # (N, K)
    per_view = torch.softmax(views / temperature, dim=2)  # (8, N, K)
    of_call = per_view.gather(2, expected_calls.view(1, -1, 1).expand(8, -1, 1)).squeeze(2)  # (8, N)
    np.testing.assert_allclose(scores["max_prob"], probs.max(1).values.numpy(), rtol=1e-5)
    np.testing.assert_allclose(scores["margin"], (probs.topk(2, dim=1).values[:, 0] - probs.topk(2, dim=1).values[:, 1]).numpy(),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(scores["view_mean"], of_call.mean(0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(scores["view_min"], of_call.min(0).values.numpy(), rtol=1e-5)
    agreement = (per_view.argmax(2) == expected_calls).float().mean(0).numpy()  # (N,)
    assert np.array_equal(np.floor(scores["view_agreement"] * 8 + 1e-9) / 8, agreement)
