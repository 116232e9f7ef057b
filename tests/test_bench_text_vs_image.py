"""bench/text_vs_image.py: the class-similarity structure of text and images, checked against
scikit-learn's cosine similarity and hand-made structures."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics.pairwise import cosine_similarity

from multifusion.text.features import TextFeatures

spec = importlib.util.spec_from_file_location("text_vs_image", Path(__file__).parents[1] / "bench/text_vs_image.py")
text_vs_image = importlib.util.module_from_spec(spec)
spec.loader.exec_module(text_vs_image)


def test_class_cosine_is_the_cosine_of_the_class_means():
    rng = np.random.default_rng(0)
    vectors, labels = rng.normal(size=(30, 7)), np.arange(30) % 4
    means = np.stack([vectors[labels == k].mean(0) for k in range(4)])
    np.testing.assert_allclose(text_vs_image.class_cosine(vectors, labels, 4), cosine_similarity(means), atol=1e-12)


def test_text_embeddings_average_the_real_tokens_only():
    states = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    text = TextFeatures(states, mask, ["a", "b"], ["t", "t"], [0, 0])
    expected = np.stack([states[0, :2].mean(0).numpy(), states[1].mean(0).numpy()])
    np.testing.assert_allclose(text_vs_image.text_embeddings(text), expected, atol=1e-6)


def test_compare_structure_agrees_with_itself_and_names_each_nearest_class():
    # two pairs of look-alikes: (0, 1) and (2, 3)
    sim = np.array([[1.0, 0.9, 0.1, 0.2], [0.9, 1.0, 0.3, 0.1], [0.1, 0.3, 1.0, 0.8], [0.2, 0.1, 0.8, 1.0]])
    rho, _, nearest = text_vs_image.compare_structure(sim, sim)
    assert rho == pytest.approx(1.0)
    assert nearest == [(0, 1, 1), (1, 0, 0), (2, 3, 3), (3, 2, 2)]
    crossed = sim[[0, 2, 1, 3]][:, [0, 2, 1, 3]]  # the same structure on relabelled classes: (0, 2) and (1, 3)
    rho, _, nearest = text_vs_image.compare_structure(sim, crossed)
    assert rho < 0.5
    assert [image for _, _, image in nearest] == [2, 3, 0, 1]
