"""Baselines: timm's parameter counts, forward shapes on grey 64 px input, gradients to
every parameter, and the attention / graph pieces against PyTorch and brute-force
references."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from multifusion.model.baselines import build_baseline, swin_window_size, vit_patch_size
from multifusion.model.baselines.swin import WindowAttention, shifted_window_mask
from multifusion.model.baselines.vig import MRConv2d, dilated_knn
from multifusion.model.layers import Attention

NAMES = ["resnet18", "resnet50", "vit_small", "swin_tiny", "vig"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet18", 11_689_512),  # torchvision / timm resnet18
        ("resnet50", 25_557_032),  # torchvision / timm resnet50
        ("vit_small", 22_050_664),  # timm vit_small_patch16_224
        ("swin_tiny", 28_288_354),  # timm swin_tiny_patch4_window7_224
    ],
)
def test_parameter_count_matches_timm(name: str, expected: int) -> None:
    model = build_baseline(name, num_classes=1000, image_size=224, in_chans=3)
    assert n_params(model) == expected


def test_matched_sizes() -> None:
    assert [vit_patch_size(s) for s in (224, 128, 64, 32)] == [16, 16, 8, 4]
    assert [swin_window_size(s) for s in (224, 128, 64, 32)] == [7, 4, 4, 4]
    with pytest.raises(ValueError, match="multiple of 32"):
        swin_window_size(100)
    with pytest.raises(ValueError, match="unknown baseline"):
        build_baseline("resnet101", 3, 64)


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_grey_64px(name: str) -> None:
    torch.manual_seed(0)
    model = build_baseline(name, num_classes=7, image_size=64).eval()
    assert hasattr(model, "forward_features") and hasattr(model, "forward_head")
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


SMALL = {
    "resnet18": dict(zero_init_last=False),  # timm zero-inits the last BN: no grad flows to its branch at init
    "resnet50": dict(zero_init_last=False),
    "vit_small": dict(depth=2),
    "swin_tiny": dict(depths=(2, 2, 2, 2), embed_dim=24),  # shifted windows still present in stages 1-2
    "vig": dict(depth=2, dim=32, head_hidden=64),
}


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(name: str) -> None:
    torch.manual_seed(0)
    size = 32 if name.startswith("resnet") else 64  # ResNets are size-agnostic: the smallest that keeps 1x1 at stride 32
    model = build_baseline(name, num_classes=5, image_size=size, **SMALL[name]).train()
    x = torch.randn(4, 1, size, size)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}.{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}.{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}.{pname} has an all-zero gradient"


def _load_mha(mha: nn.MultiheadAttention, qkv: nn.Linear, proj: nn.Linear) -> None:
    with torch.no_grad():
        mha.in_proj_weight.copy_(qkv.weight)
        mha.in_proj_bias.copy_(qkv.bias)
        mha.out_proj.weight.copy_(proj.weight)
        mha.out_proj.bias.copy_(proj.bias)


def test_vit_attention_equals_torch_multihead_attention() -> None:
    torch.manual_seed(0)
    attn = Attention(48, heads=6)
    mha = nn.MultiheadAttention(48, 6, batch_first=True)
    _load_mha(mha, attn.qkv, attn.proj)
    x = torch.randn(3, 10, 48)
    torch.testing.assert_close(attn(x), mha(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)


def test_window_attention_bias_and_mask_equal_torch_attention() -> None:
    torch.manual_seed(0)
    w, heads, dim = 3, 2, 16
    attn = WindowAttention(dim, heads, w)
    x = torch.randn(4, w * w, dim)  # 2 images x 2 windows
    mask = torch.where(torch.rand(2, w * w, w * w) > 0.5, 0.0, -100.0)  # (nW, N, N)
    bias = attn.relative_position_bias_table[attn.relative_position_index].permute(2, 0, 1)  # (h, N, N)
    # reference: per window, torch MHA with an additive float mask of bias + window mask
    mha = nn.MultiheadAttention(dim, heads, batch_first=True)
    _load_mha(mha, attn.qkv, attn.proj)
    ref = []
    for b in range(4):
        m = bias + mask[b % 2]  # windows of one image are consecutive: b = image * nW + window
        ref.append(mha(x[b : b + 1], x[b : b + 1], x[b : b + 1], attn_mask=m, need_weights=False)[0])
    torch.testing.assert_close(attn(x, mask), torch.cat(ref), rtol=1e-5, atol=1e-5)


def test_relative_position_bias_depends_only_on_offset() -> None:
    attn = WindowAttention(8, 2, 4)
    idx = attn.relative_position_index
    coords = [(i, j) for i in range(4) for j in range(4)]
    for a, (ya, xa) in enumerate(coords):
        for b, (yb, xb) in enumerate(coords):
            assert idx[a, b] == (ya - yb + 3) * 7 + (xa - xb + 3)


@pytest.mark.parametrize("H, w, shift", [(8, 4, 2), (12, 3, 1), (14, 7, 3)])
def test_shifted_window_mask_blocks_exactly_the_wrapped_pairs(H: int, w: int, shift: int) -> None:
    mask = shifted_window_mask(H, H, w, shift)  # (nW, w*w, w*w), windows row-major over the rolled grid
    nw = H // w
    for win in range(nw * nw):
        r0, c0 = (win // nw) * w, (win % nw) * w
        cells = [(r0 + i, c0 + j) for i in range(w) for j in range(w)]  # rolled positions
        for a, (ra, ca) in enumerate(cells):
            for b, (rb, cb) in enumerate(cells):
                # original position of rolled cell p is (p + shift) mod H; a pair is allowed iff
                # it was adjacent in the original image (no wrap-around between them)
                same = ((ra + shift) % H - (rb + shift) % H == ra - rb) and ((ca + shift) % H - (cb + shift) % H == ca - cb)
                assert (mask[win, a, b] == 0) == same


def test_dilated_knn_equals_brute_force() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 20, 8)
    idx = dilated_knn(x, k=4, dilation=2)  # (B, N, 4)
    sim = F.cosine_similarity(x[:, :, None], x[:, None, :], dim=-1)  # (B, N, N)
    sim.diagonal(dim1=1, dim2=2).fill_(float("inf"))  # self first, as the reference's distance 0
    ref = sim.argsort(dim=-1, descending=True)[:, :, :8:2]
    assert torch.equal(idx, ref)


def test_mrconv_equals_loop_reference() -> None:
    torch.manual_seed(0)
    conv = MRConv2d(8, 16).eval()
    x = torch.randn(2, 8, 6)  # (B, C, N)
    idx = torch.randint(0, 6, (2, 6, 3))
    out = conv(x, idx)
    h = torch.zeros(2, 16, 6, 1)
    for b in range(2):
        for i in range(6):
            rel = torch.stack([x[b, :, j] - x[b, :, i] for j in idx[b, i]]).amax(0)  # (C,)
            inter = torch.stack([x[b, :, i], rel], dim=1).reshape(16)  # [x0, r0, x1, r1, ...]
            h[b, :, i, 0] = inter
    torch.testing.assert_close(out, conv.nn(h).squeeze(-1), rtol=1e-5, atol=1e-5)


def test_mrconv_relative_term_and_gradient_match_the_reference_order() -> None:
    """The max-relative term max_j (x_j - x_i), computed as max_j x_j - x_i: the same values
    bit for bit and the same gradient as the reference's subtract-then-max."""
    from multifusion.model.baselines.vig import gather_nodes

    torch.manual_seed(1)
    x = torch.randn(3, 16, 10, dtype=torch.float64, requires_grad=True)  # (B, C, N)
    idx = torch.randint(0, 10, (3, 10, 4))  # (B, N, k)
    ref = (gather_nodes(x, idx) - x.unsqueeze(-1)).amax(dim=-1)  # the reference's order
    ours = gather_nodes(x, idx).amax(dim=-1) - x
    assert torch.equal(ours, ref)
    upstream = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad(ref, x, upstream)
    (g_ours,) = torch.autograd.grad(ours, x, upstream)
    torch.testing.assert_close(g_ours, g_ref)
    conv = MRConv2d(16, 32).double()
    assert torch.autograd.gradcheck(lambda t: conv(t, idx), (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("k", [1, 4, 14])
def test_max_over_neighbours_matches_gather_and_amax(k: int) -> None:
    """Both paths equal PyTorch's gather + amax on random inputs bit for bit: the autograd path
    (with its gradient) and the in-place row fold of inference."""
    from multifusion.model.baselines.vig import gather_nodes, max_over_neighbours

    torch.manual_seed(k)
    x = torch.randn(3, 16, 20, dtype=torch.float64, requires_grad=True)  # (B, C, N)
    idx = torch.randint(0, 20, (3, 20, k))  # (B, N, k)
    ref = gather_nodes(x, idx).amax(dim=-1)  # (B, C, N)
    ours = max_over_neighbours(x, idx)
    assert ours.shape == (3, 16, 20) and torch.equal(ours, ref)
    with torch.no_grad():
        assert torch.equal(max_over_neighbours(x, idx), ref)
    upstream = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad(ref, x, upstream)
    (g_ours,) = torch.autograd.grad(ours, x, upstream)
    torch.testing.assert_close(g_ours, g_ref)


def test_every_comparison_model_builds_and_runs(make_config) -> None:
    """Each name of compare.models: its config (ablation overrides applied) builds a model
    mapping grey images to logits; unknown names are a clear error."""
    from multifusion.training.compare import build_variant, variant_config
    from multifusion.text.features import random_text_features

    cfg = make_config({"hnf.dim": 16, "hnf.layers": 2})
    text = random_text_features(["a", "b", "c"], length=5, dim=8)
    for name in cfg.compare.models:
        cfg_run = variant_config(cfg, name)
        for key, value in cfg.compare.ablations.get(name, {}).items():
            section, field = key.split(".")
            assert getattr(getattr(cfg_run, section), field) == value
        if name.startswith("mf_"):  # only the ablations: the full baselines are checked above
            model = build_variant(name, cfg_run, ["a", "b", "c"], text).eval()
            with torch.no_grad():
                assert model(torch.randn(2, 1, 64, 64)).shape == (2, 3)
    assert variant_config(cfg, "resnet18") == cfg
    with pytest.raises(ValueError, match="unknown model 'resnet101'"):
        variant_config(cfg, "resnet101")


def test_a_model_recipe_sets_its_optimiser_and_never_the_budget(make_config) -> None:
    """compare.recipes: the named model trains with its own train.* optimiser keys, every
    other model with the shared ones; a recipe touching the budget is a one-line error."""
    from multifusion.training.compare import variant_config

    cfg = make_config({"compare.recipes": {"swin_tiny": {"train.lr": 0.0001, "train.warmup_epochs": 3}}})
    swin = variant_config(cfg, "swin_tiny")
    assert (swin.train.lr, swin.train.warmup_epochs) == (0.0001, 3)
    assert swin.train.epochs == cfg.train.epochs and swin.train.augment == cfg.train.augment
    assert variant_config(cfg, "resnet18").train == cfg.train
    for key, value in (("train.epochs", 60), ("train.augment.crop_scale", 0.5), ("hnf.dim", 8)):
        bad = make_config({"compare.recipes": {"vig": {key: value}}})
        with pytest.raises(ValueError, match=f"compare.recipes.vig may set the optimiser only .*{key}"):
            variant_config(bad, "vig")


def test_ffn_channels_last_path_equals_the_plain_nchw_block() -> None:
    """vig.FFN runs its 1x1 convs on a channels-last copy (a speed path): the output and the
    input gradient equal the plain NCHW residual block's, and the output stays NCHW."""
    from multifusion.model.baselines.vig import FFN

    torch.manual_seed(0)
    ffn = FFN(16, 64, 0.0).double()
    x = torch.randn(3, 16, 5, 5, dtype=torch.float64, requires_grad=True)
    out = ffn(x)
    ref = x + ffn.fc2(ffn.act(ffn.fc1(x)))  # the reference order on the NCHW tensor (train-mode BN, same batch)
    torch.testing.assert_close(out, ref)
    assert out.is_contiguous()
    upstream = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, upstream)[0], torch.autograd.grad(ref, x, upstream)[0])
