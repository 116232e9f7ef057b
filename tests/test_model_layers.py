"""The shared layers (multifusion.model.layers) against PyTorch references: cross-attention
and its weights against nn.MultiheadAttention, Block against nn.TransformerEncoderLayer,
DropPath's keep rate, and the zero-started gate."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from multifusion.model.layers import Block, CrossAttention, DropPath, Mlp, ZeroInitLinear


def _mha_of(attn: CrossAttention, dim: int, heads: int) -> nn.MultiheadAttention:
    """torch's MHA holding the same weights: in_proj = [q; k; v], kv's rows are [k; v]."""
    mha = nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.kv.weight]))
        mha.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.kv.bias]))
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
    return mha


def test_cross_attention_and_its_weights_equal_torch_multihead_attention() -> None:
    torch.manual_seed(0)
    attn = CrossAttention(24, heads=4).eval()
    mha = _mha_of(attn, 24, 4).eval()
    x, context = torch.randn(3, 5, 24), torch.randn(3, 7, 24)  # (B, N, C), (B, M, C)
    out, weights = mha(x, context, context, need_weights=True, average_attn_weights=False)  # (B, N, C), (B, h, N, M)
    torch.testing.assert_close(attn(x, context), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn.attention_weights(x, context), weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn(x), mha(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)  # self-attention


def test_block_equals_torch_pre_norm_encoder_layer() -> None:
    """Block with CrossAttention (eps 1e-5, no dropout) is nn.TransformerEncoderLayer(norm_first, GELU)."""
    torch.manual_seed(0)
    dim, heads = 16, 2
    block = Block(dim, heads, mlp_ratio=2.0, eps=1e-5, attn_layer=CrossAttention).eval()
    ref = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True).eval()
    ref.self_attn.load_state_dict(_mha_of(block.attn, dim, heads).state_dict())
    for ours, theirs in ((block.norm1, ref.norm1), (block.norm2, ref.norm2), (block.mlp.fc1, ref.linear1), (block.mlp.fc2, ref.linear2)):
        theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 9, dim)
    torch.testing.assert_close(block(x), ref(x), rtol=1e-5, atol=1e-5)


def test_mlp_is_linear_gelu_linear() -> None:
    torch.manual_seed(0)
    mlp = Mlp(6, 10)
    x = torch.randn(4, 6)
    torch.testing.assert_close(mlp(x), mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x))))


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_drop_path_drops_whole_samples_and_keeps_the_mean(p: float) -> None:
    torch.manual_seed(0)
    drop = DropPath(p).train()
    out = drop(torch.ones(20_000, 3, 4))
    per_sample = out.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / (1 - p)).all(1)).all()  # a sample is dropped whole or scaled
    assert abs((per_sample[:, 0] == 0).float().mean().item() - p) < 0.02
    assert drop.eval()(out) is out  # identity at eval


def test_zero_init_linear_starts_at_zero_and_draws_like_a_linear() -> None:
    torch.manual_seed(0)
    gate = ZeroInitLinear(8, 3)
    after_gate = torch.randn(5)
    torch.manual_seed(0)
    nn.Linear(8, 3)
    assert torch.equal(torch.randn(5), after_gate)  # the same random draws as nn.Linear: later modules init alike
    assert not gate.weight.any() and not gate.bias.any()
    with torch.no_grad():
        gate.weight.fill_(1.0)
    gate.reset_parameters()
    assert not gate.weight.any()
