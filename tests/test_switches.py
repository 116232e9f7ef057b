"""The switches no other test reaches, each through the code path that reads it, against a
reference computed here with numpy / Pillow / torch / scikit-learn:

- ``hnf.stem: linear``: the patch tokens are a ViT patchify + linear map + 2-D positions, the
  model has no global token, and every parameter trains;
- ``data.aspect`` (crop | pad) and ``data.infobar`` (auto | none): what ``prepare`` stores is
  the Lanczos resize of the square a user expects (bar cropped or kept, centred crop or
  median-padded square);
- ``train.balance: loss`` and ``train.label_smoothing``: the loss ``fit`` logs is torch's
  ``F.cross_entropy`` with inverse-frequency class weights (scikit-learn's "balanced") and
  the smoothing;
- ``train.grad_clip``: the gradients ``fit`` steps with are those of
  ``torch.nn.utils.clip_grad_norm_`` (a global norm <= train.grad_clip).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight
from torch.optim.optimizer import register_optimizer_step_pre_hook

from multifusion.model import build_model
from multifusion.training.train import class_weights, fit

# -- hnf.stem: linear ---------------------------------------------------------------------

LINEAR = {"data.image_size": 32, "hnf.stem": "linear", "hnf.layers": 2, "hnf.patch_sizes": [16, 8], "hnf.dim": 16,
          "hnf.heads": 2, "fusion.heads": 2, "hnf.dropout": 0.0}


def patchify(x: np.ndarray, p: int) -> np.ndarray:
    """(B, S, S) -> (B, (S/p)^2, p*p): row-major patches, each row-major inside."""
    b, s, _ = x.shape
    g = s // p
    return x.reshape(b, g, p, g, p).transpose(0, 1, 3, 2, 4).reshape(b, g * g, p * p)


def test_linear_stem_is_a_patchify_and_linear_map_and_trains(make_config):
    from test_model_hnf import assert_trains, names, random_text

    torch.manual_seed(0)
    model = build_model(make_config(LINEAR), names(3), random_text())
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens, pooled = model.embed(x)
    assert pooled is None and model.global_proj is None  # no backbone: no global token
    for p, proj, pos, got in zip([16, 8], model.embed.proj, model.embed.pos, tokens):
        w = proj.weight.detach().numpy().reshape(16, p * p)  # (C, p*p)
        positions = (pos.rows + pos.cols).detach().numpy().reshape(-1, 16)  # (g*g, C)
        expected = patchify(x[:, 0].numpy(), p) @ w.T + proj.bias.detach().numpy() + positions  # (B, g*g, C)
        np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert model.forward_features(x).shape == (2, 2, 16)  # h_fus of the 2 layers, no global token
    assert_trains(model, x, 3)


# -- data.aspect and data.infobar, through prepare ----------------------------------------

H, W, BAR, SIZE = 80, 120, 12, 32


def micrograph(seed: int) -> np.ndarray:
    """uint8 (H, W): a smooth texture in multiples of 8 (so every median is a whole grey
    level) above a BAR-row dark instrument strip with bright text-like marks."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(5, 27, (8, 12)).astype(np.float32) * 8
    texture = np.asarray(Image.fromarray(coarse).resize((W, H), Image.Resampling.BILINEAR))
    image = (np.round(texture / 8) * 8).astype(np.uint8)
    image[H - BAR:] = 8
    image[H - BAR + 4:H - 4, 10:40] = 240  # "text" on the bar
    image[H - BAR + 5:H - 5, 80:110] = 240  # "scale bar"
    return image


def expected_square(image: np.ndarray, aspect: str, infobar: str) -> np.ndarray:
    """What models must see, built with numpy and Pillow: the micrograph (without the bar
    when infobar is auto), centre-cropped or padded with its median to a square, then
    Lanczos-resized to SIZE (Pillow, in float; the product may round a tie the other way)."""
    content = image[: H - BAR] if infobar == "auto" else image
    rows, cols = content.shape
    if aspect == "crop":
        side = min(rows, cols)
        top, left = (rows - side) // 2, (cols - side) // 2
        square = content[top:top + side, left:left + side]
    else:
        median = np.median(content)
        assert median == int(median)
        side = max(rows, cols)
        square = np.full((side, side), int(median), np.uint8)
        top, left = (side - rows) // 2, (side - cols) // 2
        square[top:top + rows, left:left + cols] = content
    resized = Image.fromarray(square.astype(np.float32)).resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    return np.clip(np.rint(np.asarray(resized)), 0, 255)


@pytest.mark.parametrize("aspect", ["crop", "pad"])
@pytest.mark.parametrize("infobar", ["auto", "none"])
def test_prepare_squares_and_crops_as_the_switches_say(aspect, infobar, make_config, tmp_path):
    from multifusion.data.prepare import prepare_dataset

    raw = {}
    for c in range(2):
        for i in range(3):
            path = tmp_path / "raw" / f"class_{c}" / f"shot_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            raw[path.name, f"class_{c}"] = micrograph(10 * c + i)
            Image.fromarray(raw[path.name, f"class_{c}"]).save(path)
    data = make_config({"data.image_size": SIZE, "data.aspect": aspect, "data.infobar": infobar, "data.workers": 1,
                        "data.grey_levels": "raw"}).data  # the geometry; standardize: test_prepare
    prepare_dataset(tmp_path / "raw", tmp_path / "prepared", data, 0, progress=False)
    manifest = pd.read_parquet(tmp_path / "prepared" / "manifest.parquet")
    images = np.load(tmp_path / "prepared" / "images.npy")
    assert len(manifest) == len(raw) == len(images)
    for row, stored in zip(manifest.itertuples(), images):
        original = raw[row.path.split("/")[-1], row.class_name]
        assert row.bar_rows == (BAR if infobar == "auto" else 0)
        difference = np.abs(stored.astype(int) - expected_square(original, aspect, infobar))
        assert difference.max() <= 1, f"{row.path}: {aspect}/{infobar} differs from the reference by {difference.max()}"


# -- train.balance, train.label_smoothing, train.grad_clip, through fit --------------------

FIT = {"data.image_size": 16, "hnf.stem": "conv", "train.epochs": 1, "train.batch_size": 64, "train.warmup_epochs": 0,
       "train.augment.flips": False, "train.augment.rot90": False}
TRAIN_COUNTS = (12, 4, 2)  # a long tail: class weights 18 / (3 * count) = 0.5, 1.5, 3


def long_tailed(make_prepared) -> tuple:
    """A prepared set whose train split holds TRAIN_COUNTS images of the 3 classes (the rest
    of the 12 per class moved to test); -> (directory, train labels)."""
    directory = make_prepared(per_class={"train": 12, "val": 4, "test": 4})
    manifest = pd.read_parquet(directory / "manifest.parquet")
    for label, count in enumerate(TRAIN_COUNTS):
        rows = manifest.index[(manifest.split == "train") & (manifest.label == label)]
        manifest.loc[rows[count:], "split"] = "test"
    manifest.to_parquet(directory / "manifest.parquet", index=False)
    return directory, manifest.label[manifest.split == "train"].to_numpy().copy()


def fit_linear(make_config, prepared, out, overrides: dict, weight_std: float = 0.0) -> None:
    """fit() a (B, 1, 16, 16) -> (B, 3) linear model; with weight_std 0 its logits are its bias,
    the same for every image, so the logged train loss does not depend on the batch order."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 3))
    model.architecture = {"name": "linear", "args": {}}  # the card's record of this test-only model
    with torch.no_grad():
        model[1].weight.normal_(0, weight_std)
        model[1].bias.copy_(torch.tensor([1.5, -0.5, 0.25]))
    cfg = make_config(FIT | overrides)
    fit(model, cfg, prepared, out / "model", out / "checkpoints", out / "live", "linear")


def test_class_weights_are_scikit_learns_balanced_weights():
    labels = np.random.default_rng(0).choice(5, size=200, p=[0.5, 0.25, 0.15, 0.07, 0.03])
    np.testing.assert_allclose(class_weights(labels, 5), compute_class_weight("balanced", classes=np.arange(5), y=labels))
    assert class_weights(np.array([0, 0, 2]), 3).tolist() == [0.5, 0.0, 1.0]  # an absent class weighs nothing


@pytest.mark.parametrize("balance, smoothing", [("loss", 0.0), ("loss", 0.2), ("none", 0.0), ("none", 0.2)])
def test_fit_loss_is_torch_cross_entropy_with_balance_and_smoothing(balance, smoothing, make_config, make_prepared, tmp_path):
    prepared, labels = long_tailed(make_prepared)
    fit_linear(make_config, prepared, tmp_path, {"train.balance": balance, "train.label_smoothing": smoothing})
    logged = json.loads((tmp_path / "live" / "metrics.json").read_text())["train"]["loss"]  # the one step's loss

    logits = torch.tensor([1.5, -0.5, 0.25]).expand(len(labels), 3)  # (N, 3)
    target = torch.as_tensor(labels)
    balanced = torch.as_tensor(compute_class_weight("balanced", classes=np.arange(3), y=labels), dtype=torch.float32)
    references = {
        (b, s): float(F.cross_entropy(logits, target, weight=balanced if b == "loss" else None, label_smoothing=s))
        for b in ("loss", "none") for s in (0.0, 0.2)
    }
    assert logged == pytest.approx(references[balance, smoothing], rel=1e-6)
    for other, value in references.items():  # the switches change the loss: the test tells them apart
        if other != (balance, smoothing):
            assert logged != pytest.approx(value, rel=1e-3), other


def first_step_gradients(make_config, prepared, out, clip: float) -> list[torch.Tensor]:
    """The gradients fit() hands its optimizer at the first step (after any clipping)."""
    seen: list[list[torch.Tensor]] = []

    def record(optimizer, args, kwargs):
        if not seen:
            seen.append([p.grad.detach().clone() for group in optimizer.param_groups for p in group["params"]])

    handle = register_optimizer_step_pre_hook(record)
    try:
        fit_linear(make_config, prepared, out, {"train.grad_clip": clip}, weight_std=0.5)
    finally:
        handle.remove()
    return seen[0]


def test_fit_clips_the_global_gradient_norm_as_torch_does(make_config, make_prepared, tmp_path):
    prepared, _ = long_tailed(make_prepared)
    raw = first_step_gradients(make_config, prepared, tmp_path / "off", 0.0)  # train.grad_clip 0: off
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in raw])))
    per_tensor = [float(torch.linalg.vector_norm(g)) for g in raw]
    limit = norm / 4
    assert len(raw) == 2 and min(per_tensor) < limit  # the weight and the bias: global and per-tensor clipping differ

    clipped = first_step_gradients(make_config, prepared, tmp_path / "on", limit)
    reference = [torch.nn.Parameter(torch.zeros_like(g)) for g in raw]
    for p, g in zip(reference, raw):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(reference, limit)
    for got, want in zip(clipped, reference):
        torch.testing.assert_close(got, want.grad, rtol=1e-6, atol=1e-9)
    assert float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in clipped]))) <= limit * (1 + 1e-6)

    loose = first_step_gradients(make_config, prepared, tmp_path / "loose", 2 * norm)  # under the limit: untouched
    assert all(torch.equal(a, b) for a, b in zip(loose, raw))
