"""Explanation overlays: Grad-CAM against its closed form (the class activation map of a
global-average-pool + linear model), overlays that point at the evidence (a model trained
on images whose class evidence sits in one quadrant), the target-layer choice, the
input-gradient fallback, and the description attention of a text-fused MultiFusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from multifusion.data.dataset import to_model_input
from multifusion.inference.explain import Explainer, cam_target_layer, explain_batch, grad_cam, overlay, top_descriptions

S = 32


class TinyCNN(nn.Module):
    """x (B, 1, S, S) -> conv features (B, 16, S/2, S/2) -> global mean -> linear -> (B, classes)."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        )
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class WithCamLayer(TinyCNN):
    """The same network naming its feature map as MultiFusion does."""

    @property
    def cam_layer(self) -> nn.Module:
        return self.features


def quadrant_images(n: int, rng: np.random.Generator, quadrant: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, S, S): flat grey + noise; class 1 adds stripes in one quadrant (given, or random)."""
    x = 128 + rng.normal(0, 6, (n, S, S))
    labels = np.ones(n, dtype=np.int64) if quadrant is not None else rng.integers(0, 2, n)
    half = S // 2
    cols = np.arange(half)[None, :]
    for i in np.flatnonzero(labels):
        r, c = divmod(int(rng.integers(0, 4)) if quadrant is None else quadrant, 2)
        x[i, r * half:(r + 1) * half, c * half:(c + 1) * half] += 90 * np.sin(1.6 * cols + rng.uniform(0, 6))
    return np.clip(x, 0, 255).astype(np.uint8), labels


def quadrant_mass(heat: np.ndarray) -> np.ndarray:
    """(B, S, S) -> (B, 4) share of each map's mass per quadrant (row-major: TL, TR, BL, BR)."""
    mass = heat.reshape(len(heat), 2, S // 2, 2, S // 2).sum(axis=(2, 4)).reshape(len(heat), 4)
    return mass / mass.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """WithCamLayer trained for a few steps to call 'stripes anywhere' against 'blank'."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = WithCamLayer()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(120):
        x, y = quadrant_images(32, rng)
        loss = F.cross_entropy(model(to_model_input(x)), torch.as_tensor(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = quadrant_images(64, rng)
    assert (model(to_model_input(x)).argmax(1).numpy() == y).mean() > 0.95  # it learned the task
    return model.eval()


def test_grad_cam_equals_the_class_activation_map_of_a_gap_linear_model():
    torch.manual_seed(1)
    model = TinyCNN(classes=3).eval()
    x = torch.randn(4, 1, S, S)
    targets = torch.tensor([0, 1, 2, 1])
    heat, _ = grad_cam(model, x, targets, model.features[-1])  # (4, S, S)
    A = model.features(x).detach()  # (4, 16, S/2, S/2)
    W = model.fc.weight.detach()[targets]  # (4, 16)
    cam = F.relu(torch.einsum("bk,bkhw->bhw", W, A))[:, None] / (A.shape[2] * A.shape[3])  # Zhou et al.: ReLU(sum_k w_ck A_k)
    ref = F.interpolate(cam, size=(S, S), mode="bilinear", align_corners=False)[:, 0]
    peak = ref.flatten(1).amax(1)  # (4,)
    ref = ref / peak.clamp(min=1e-12)[:, None, None]
    assert heat.shape == (4, S, S) and (peak > 0).sum() >= 2  # the comparison is not all zeros
    torch.testing.assert_close(heat, ref, atol=1e-5, rtol=1e-4)


def test_target_layer_is_cam_layer_else_the_last_conv():
    named, plain = WithCamLayer(), TinyCNN()
    assert cam_target_layer(named) is named.features
    assert cam_target_layer(plain) is plain.features[4]
    assert cam_target_layer(nn.Sequential(nn.Flatten(), nn.Linear(S * S, 2))) is None


@pytest.mark.parametrize("quadrant", [0, 1, 2, 3])
def test_overlay_mass_sits_in_the_quadrant_holding_the_evidence(trained, quadrant):
    x, _ = quadrant_images(16, np.random.default_rng(10 + quadrant), quadrant)
    maps = explain_batch(trained, x, np.ones(16, dtype=np.int64))
    assert maps.method == "grad-cam" and maps.attention is None  # no text head here
    share = quadrant_mass(maps.heat)[:, quadrant]  # (16,)
    assert share.mean() > 0.7 and share.min() > 0.4, share  # chance is 0.25
    blank = explain_batch(trained, np.full((1, S, S), 128, np.uint8), np.ones(1, dtype=np.int64)).heat
    assert np.isfinite(blank).all()  # an all-zero map stays finite


def test_input_gradient_fallback_points_at_the_only_pixels_the_model_reads():
    weights = torch.zeros(2, 1, S, S)
    weights[1, 0, S // 2:, : S // 2] = 0.01  # class 1 reads the bottom-left quadrant only
    model = nn.Sequential(nn.Flatten(), nn.Linear(S * S, 2, bias=False))
    model[1].weight.data = weights.flatten(1)
    x, _ = quadrant_images(4, np.random.default_rng(3), quadrant=2)
    maps = explain_batch(model, x, np.ones(4, dtype=np.int64))
    assert maps.method == "input-gradient"
    assert quadrant_mass(maps.heat)[:, 2].min() > 0.9


def test_description_attention_of_multifusion_names_the_stored_descriptions(make_config):
    from multifusion.model import build_model
    from multifusion.model.card import text_record
    from multifusion.text.features import random_text_features

    cfg = make_config({"hnf.layers": 2, "hnf.dim": 16, "data.image_size": S, "fusion.text": True, "fusion.mode": "mha"})
    T, L = 6, 5
    text = random_text_features(["a", "b", "c"], ["morphology", "synthesis"], length=L, dim=cfg.text.hidden)
    torch.manual_seed(0)
    model = build_model(cfg, ["a", "b", "c"], text).eval()
    x, _ = quadrant_images(2, np.random.default_rng(0), quadrant=0)
    maps = explain_batch(model, x, np.array([0, 2]))
    assert maps.heat.shape == (2, S, S) and np.isfinite(maps.heat).all()
    assert maps.attention.shape == (2, T) and np.allclose(maps.attention.sum(axis=1), 1.0, atol=1e-5)
    top = top_descriptions(maps.attention[0], text_record(text), k=3)
    assert len(top) == 3 and all(c in "abc" and t in ("morphology", "synthesis") for c, t, _ in top)
    assert [w for _, _, w in top] == sorted((w for _, _, w in top), reverse=True)
    explainer = Explainer(model)  # batch 1 checks the head's shortcut, batch 2 uses it
    for seed in (1, 2):
        y, _ = quadrant_images(3, np.random.default_rng(seed), quadrant=seed)
        with torch.no_grad():
            full = model.description_attention(to_model_input(y)).numpy()  # (3, T): the contract's call
        np.testing.assert_allclose(explainer.explain(y, np.array([0, 1, 2])).attention, full, atol=1e-5)
    assert explainer.head_verified
    concat = build_model(make_config({"hnf.layers": 2, "hnf.dim": 16, "data.image_size": S, "fusion.mode": "concat"}), ["a", "b", "c"], text)
    assert explain_batch(concat.eval(), x, np.array([0, 1])).attention is None  # no cross-modal attention


class DisagreeingHead(nn.Module):
    """A head whose own description_attention is not what the model reports."""

    def forward(self, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return visual @ text.t()  # (B, T) used as logits

    def description_attention(self, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return torch.full((visual.shape[0], text.shape[0]), 1.0 / text.shape[0])


class ToyTextModel(TinyCNN):
    def __init__(self) -> None:
        super().__init__(classes=16)
        self.text = nn.Parameter(torch.randn(3, 16))
        self.head = DisagreeingHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.features(x).mean(dim=(2, 3))), self.text)  # (B, 3)

    def description_attention(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fc(self.features(x).mean(dim=(2, 3))) @ self.text.t()).softmax(dim=1)  # (B, 3)


def test_attention_shortcut_that_disagrees_with_the_model_is_dropped():
    torch.manual_seed(0)
    model = ToyTextModel().eval()
    x, _ = quadrant_images(5, np.random.default_rng(0), quadrant=1)
    explainer = Explainer(model)
    for _ in range(2):
        got = explainer.explain(x, np.zeros(5, dtype=np.int64)).attention
        with torch.no_grad():
            np.testing.assert_allclose(got, model.description_attention(to_model_input(x)).numpy(), atol=1e-6)
    assert explainer.head is None and not explainer.head_verified


def test_overlay_blends_colour_in_proportion_to_the_map():
    image = np.full((8, 8), 100, np.uint8)
    heat = np.zeros((8, 8), np.float32)
    heat[:4] = 1.0
    rgb = overlay(image, heat, scale=2)
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    assert (rgb[12:] == 100).all()  # where the map is 0 the micrograph shows unchanged
    assert np.abs(rgb[:6].astype(int) - 100).max() > 40  # where it is 1, the colour


def texture_images(n: int, rng: np.random.Generator, label: int) -> np.ndarray:
    """uint8 (n, S, S): class 0 fine diagonal stripes, class 1 coarse vertical stripes, each at a random phase + noise."""
    yy, xx = np.mgrid[0:S, 0:S]
    out = []
    for _ in range(n):
        phase = rng.uniform(0, 6)
        wave = np.sin(1.9 * (xx + yy) + phase) if label == 0 else np.sign(np.sin(0.5 * xx + phase))
        out.append(128 + 70 * wave + rng.normal(0, 8, (S, S)))
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


def test_multifusion_overlay_points_at_the_half_holding_the_explained_material(make_config):
    """The default architecture (graph stem, Grad-CAM on its last block, text-fused head),
    trained to tell two textures apart, explains two-material mosaics [A | B]: the overlay's
    mass sits on the half of the class it explains (the check bench/gradcam_meaning.py runs
    on the trained default models: 0.78 on the synthetic default, chance 0.5)."""
    from multifusion.model import build_model
    from multifusion.text.features import random_text_features

    cfg = make_config({"hnf.layers": 2, "hnf.dim": 16, "hnf.stem_width": 32, "hnf.stem_depth": 2, "data.image_size": S})
    assert cfg.hnf.stem == "graph" and cfg.fusion.text and cfg.fusion.mode == "mha"  # the default architecture
    text = random_text_features(["fine", "coarse"], ["morphology"], length=5, dim=cfg.text.hidden)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model(cfg, ["fine", "coarse"], text)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(40):
        x = np.concatenate([texture_images(8, rng, 0), texture_images(8, rng, 1)])
        loss = F.cross_entropy(model(to_model_input(x)), torch.tensor([0] * 8 + [1] * 8))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    fine, coarse = texture_images(12, rng, 0), texture_images(12, rng, 1)
    with torch.no_grad():
        calls = model(to_model_input(np.concatenate([fine, coarse]))).argmax(1).numpy()
    assert (calls == [0] * 12 + [1] * 12).mean() > 0.9  # it learned the task
    half = S // 2
    mosaics = np.concatenate([np.concatenate([fine[:, :, :half], coarse[:, :, half:]], axis=2),   # [fine | coarse]
                              np.concatenate([coarse[:, :, :half], fine[:, :, half:]], axis=2)])  # [coarse | fine]
    fine_left = np.r_[np.ones(12, bool), np.zeros(12, bool)]
    shares = []
    for target in (0, 1):
        heat = explain_batch(model, mosaics, np.full(24, target)).heat  # (24, S, S)
        on_left = heat[:, :, :half].sum(axis=(1, 2)) / np.maximum(heat.sum(axis=(1, 2)), 1e-12)  # (24,)
        target_left = fine_left if target == 0 else ~fine_left
        shares.append(np.where(target_left, on_left, 1.0 - on_left))
    shares = np.concatenate(shares)  # (48,) mass on the explained class's half
    assert shares.mean() > 0.65 and (shares > 0.5).mean() > 0.75, (shares.mean(), (shares > 0.5).mean())
