"""The benches that measure what the text can do: bench/text_vs_image.py (the class-similarity
structure of text and images, against scikit-learn's cosine similarity and hand-made
structures) and bench/subsample_train.py (the low-label training sets)."""

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


def test_subsample_train_keeps_k_per_class_and_every_val_and_test_image(make_prepared, tmp_path):
    from multifusion.data.dataset import load_prepared

    spec = importlib.util.spec_from_file_location("subsample_train", Path(__file__).parents[1] / "bench/subsample_train.py")
    subsample_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(subsample_train)
    source = make_prepared(per_class={"train": 6, "val": 2, "test": 3}, classes=3)
    counts = subsample_train.subsample(source, tmp_path / "k4", per_class=4, seed=0)
    assert counts == {"train": 12, "val": 6, "test": 9}
    full, small = load_prepared(source), load_prepared(tmp_path / "k4")
    assert small.classes == full.classes
    assert small.manifest[small.manifest.split == "train"].groupby("label").size().tolist() == [4, 4, 4]
    for split in ("val", "test"):  # untouched, image for image
        np.testing.assert_array_equal(np.asarray(small.images)[small.split_indices(split)], np.asarray(full.images)[full.split_indices(split)])
    kept = small.manifest.id.tolist()
    rows = {row_id: i for i, row_id in enumerate(full.manifest.id)}
    np.testing.assert_array_equal(np.asarray(small.images), np.asarray(full.images)[[rows[i] for i in kept]])
    assert subsample_train.subsample(source, tmp_path / "again", per_class=4, seed=0) == counts
    assert load_prepared(tmp_path / "again").manifest.id.tolist() == kept  # the draw is fixed by the seed
    with pytest.raises(ValueError, match="another directory"):
        subsample_train.subsample(source, source, per_class=4, seed=0)
