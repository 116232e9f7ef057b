"""The graph stem (hnf.stem: graph): the ViG baseline's trunk, tapped at one depth per HNF
layer (coarse layers deeper), average-pooled to each layer's grid."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from multifusion.model import build_model
from multifusion.model.baselines.vig import VisionGNN
from multifusion.model.graph_stem import GraphStem, tap_blocks
from multifusion.text.features import random_text_features


@pytest.mark.parametrize("depth,layers,expected", [(12, 3, [12, 8, 4]), (12, 1, [12]), (12, 4, [12, 9, 6, 3]), (2, 3, [2, 2, 1])])
def test_coarse_layers_read_deeper_blocks(depth, layers, expected):
    assert tap_blocks(depth, layers) == expected


def test_trunk_is_the_vig_baseline_trunk():
    """Same weights -> the stem's last map is VisionGNN.forward_features (the ViG-Ti baseline)."""
    torch.manual_seed(0)
    vig = VisionGNN(64, num_classes=5, dim=32, depth=4).eval()
    stem = GraphStem(64, [32, 16, 8], width=32, depth=4).eval()
    stem_state = {"stem." + k[len("stem."):]: v for k, v in vig.state_dict().items() if k.startswith("stem.")}
    stem_state["pos_embed"] = vig.pos_embed.detach()
    for i in range(4):  # backbone = [Grapher_1, FFN_1, ...]; blocks[i] = Sequential(Grapher, FFN)
        for j in range(2):
            for k, v in vig.backbone[2 * i + j].state_dict().items():
                stem_state[f"blocks.{i}.{j}.{k}"] = v
    stem.load_state_dict(stem_state)
    x = torch.randn(3, 1, 64, 64)
    maps, last = stem(x)
    torch.testing.assert_close(last, vig.forward_features(x))
    # taps for 3 layers of depth 4: [4, 3, 2] -> patch 32 reads block 4, 16 block 3, 8 block 2
    h = vig.stem(x) + vig.pos_embed
    states = []
    for i in range(4):
        h = vig.backbone[2 * i + 1](vig.backbone[2 * i](h))
        states.append(h)
    torch.testing.assert_close(maps[32], F.avg_pool2d(states[3], 4))  # (B, 32, 2, 2)
    torch.testing.assert_close(maps[16], F.avg_pool2d(states[2], 2))  # (B, 32, 4, 4)
    torch.testing.assert_close(maps[8], states[1])  # (B, 32, 8, 8)


def test_small_grids_get_fewer_neighbours():
    """A 4 x 4 grid (16 nodes) cannot hold the reference's 9 -> 18 neighbours: the stem builds
    with fewer and runs."""
    stem = GraphStem(32, [16, 8], width=16, depth=3)
    maps, last = stem(torch.randn(2, 1, 32, 32))
    assert maps[16].shape == (2, 16, 2, 2) and maps[8].shape == (2, 16, 4, 4) and last.shape == (2, 16, 4, 4)


def test_default_model_uses_the_graph_stem_at_vig_tiny_width(make_config):
    cfg = make_config()
    assert cfg.hnf.stem == "graph"
    classes = [f"c{k}" for k in range(4)]
    model = build_model(cfg, classes, random_text_features(classes, ["a", "b"], 5, 384, 0))
    assert isinstance(model.embed.stem, GraphStem)
    assert model.embed.stem.grid == cfg.data.image_size // min(model.patch_sizes)
    assert model.cam_layer is model.embed.stem.blocks[-1]
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 4)
