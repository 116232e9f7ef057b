"""MultiFusion: Hierarchical Network Fusion over patch sequences and patch graphs, fused
with the class-description text by cross-modal attention.

Per HNF layer l = 1..L (patch sizes coarse to fine):
  tokens_l = patch embedding at p_l + 2-D positions                        (B, N_l, C)
  sequence: [CLS_l; tokens_l] -> bidirectional ODE | transformer | none -> h_CLS(l)  (B, C)
  graph:    kNN(tokens_l) + virtual node VN_l -> Chebyshev convs -> e_VN(l)           (B, C)
  MoE gate: h_fus(l) = MoE(h_CLS(l), e_VN(l))                                         (B, C)
  CLS_{l+1} = cls_{l+1} + h_fus(l);  VN_{l+1} = vn_{l+1} + h_fus(l)
global token (hnf.global_token): the backbone's deepest map, pooled and projected       (B, C)
forward_features: x (B, 1, S, S) -> [h_fus(1) .. h_fus(L), global] (B, L (+1), C)
forward_head:     (B, L (+1), C) -> logits (B, num_classes), through the text fusion head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from multifusion.core.config import FusionConfig, GraphConfig, HNFConfig, section_from_dict
from multifusion.model.fusion import MODES, ConcatHead, CrossModalHead, TextEmbedding, VisualHead
from multifusion.model.graph import PatchGraphEncoder
from multifusion.model.moe import MoEGate
from multifusion.model.ode import build_sequence_encoder
from multifusion.model.patch_embed import HierarchicalPatchEmbed, derive_patch_sizes
from multifusion.model.registry import register_model
from multifusion.text.features import TextFeatures


class HNFLayer(nn.Module):
    """One HNF layer: sequence branch and/or graph branch, fused by the MoE gate.

    tokens (B, N, C), seed (B, C) (h_fus of the layer below; zeros for the first)
    -> h_fus (B, C).
    """

    def __init__(self, hnf: HNFConfig, g: GraphConfig) -> None:
        super().__init__()
        dim = hnf.dim
        # sequence_encoder none + graph on = graph only; with the graph off, 'none' keeps a
        # sequence branch that pools the embedded tokens (a bag-of-patches model).
        self.use_sequence = hnf.sequence_encoder != "none" or not hnf.graph
        self.use_graph = hnf.graph
        self.pools_tokens = hnf.sequence_encoder == "none"
        if self.use_sequence:
            self.cls = nn.Parameter(torch.zeros(1, 1, dim))
            nn.init.trunc_normal_(self.cls, std=0.02)
            self.sequence = build_sequence_encoder(hnf)
        if self.use_graph:
            self.virtual = nn.Parameter(torch.zeros(1, dim))
            nn.init.trunc_normal_(self.virtual, std=0.02)
            self.graph = PatchGraphEncoder(dim, g.k, g.cheb_k, g.layers, hnf.dropout, g.lambda_max)
        self.moe = MoEGate(dim, int(self.use_sequence) + int(self.use_graph))
        self.drop = nn.Dropout(hnf.dropout)

    def forward(self, tokens: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        branches = []
        if self.use_sequence:
            cls = self.cls + seed.unsqueeze(1)  # (B, 1, C)
            seq = self.sequence(torch.cat([cls, tokens], dim=1))  # (B, 1+N, C)
            # the CLS state plus the mean patch state: a direct path from every patch, which
            # trains far faster from scratch on ~1k images than the CLS readout alone
            h_cls = seq.mean(1) if self.pools_tokens else seq[:, 0] + seq[:, 1:].mean(1)  # (B, C)
            branches.append(self.drop(h_cls))
        if self.use_graph:
            e_vn = self.graph(tokens, self.virtual + seed)  # (B, C)
            branches.append(self.drop(e_vn))
        return self.moe(branches)  # h_fus (B, C)


class MultiFusion(nn.Module):
    """The HNF model with cross-modal text fusion. x (B, 1, S, S) -> logits (B, num_classes).

    ``text_states`` (T, L, D_t) / ``text_mask`` (T, L) / ``text_classes`` (T,) are the
    descriptions of ALL classes and the class each describes, stored as persistent buffers
    (None when fusion.text is false). Built from its own sections of params.yaml (``hnf``,
    ``graph``, ``fusion``) and the input size, nothing else.
    """

    def __init__(
        self,
        num_classes: int,
        image_size: int,
        hnf: HNFConfig,
        graph: GraphConfig,
        fusion: FusionConfig,
        text_states: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        text_classes: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if fusion.mode not in MODES:
            raise ValueError(f"fusion.mode must be one of {MODES}, got {fusion.mode!r}; fix params.yaml")
        if fusion.text and (text_states is None or text_mask is None or text_classes is None):
            raise ValueError("fusion.text is true but no text features were given; run embed_text or set fusion.text: false")
        self.num_classes = num_classes
        self.image_size = image_size
        self.dim = hnf.dim
        self.patch_sizes = derive_patch_sizes(image_size, hnf.layers, hnf.patch_sizes, hnf.stem)
        self.embed = HierarchicalPatchEmbed(
            image_size, self.patch_sizes, hnf.dim, hnf.stem, hnf.stem_width, hnf.stem_depth
        )
        self.embed_drop = nn.Dropout(hnf.dropout)
        self.layers = nn.ModuleList(HNFLayer(hnf, graph) for _ in self.patch_sizes)
        # the global token: the stem's globally pooled deepest map, a direct path from the whole
        # backbone to the head beside the HNF layers (None for the linear stem or when switched off)
        use_global = hnf.global_token and self.embed.global_dim is not None
        self.global_proj = nn.Sequential(nn.Linear(self.embed.global_dim, hnf.dim), nn.LayerNorm(hnf.dim)) if use_global else None
        num_tokens = len(self.patch_sizes) + int(use_global)
        self.text = TextEmbedding(text_states, text_mask, hnf.dim) if fusion.text else None
        if not fusion.text:
            self.head = VisualHead(hnf.dim, num_tokens, num_classes, hnf.dropout)
        elif fusion.mode == "mha":
            self.head = CrossModalHead(hnf.dim, fusion.heads, num_tokens, text_classes, num_classes, hnf.dropout)
        else:
            self.head = ConcatHead(hnf.dim, num_tokens, num_classes, hnf.dropout)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, S, S) -> visual tokens (B, L (+1), C): h_fus of every HNF layer, coarse to fine,
        then the global token when hnf.global_token."""
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected images (B, 1, {self.image_size}, {self.image_size}), got {tuple(x.shape)}; "
                "preprocess with multifusion.data.dataset.to_model_input at data.image_size"
            )
        seed = x.new_zeros(x.shape[0], self.dim)  # (B, C)
        fused = []
        tokens_per_layer, pooled = self.embed(x)  # [(B, N_l, C)], (B, global_dim)
        for tokens, layer in zip(tokens_per_layer, self.layers):
            seed = layer(self.embed_drop(tokens), seed)  # (B, C)
            fused.append(seed)
        if self.global_proj is not None:
            fused.append(self.global_proj(pooled))  # (B, C)
        return torch.stack(fused, dim=1)  # (B, L (+1), C)

    def text_embeddings(self) -> torch.Tensor | None:
        """(T, C) embeddings of all class descriptions, or None without text."""
        return None if self.text is None else self.text()

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        """visual tokens (B, L, C) -> logits (B, num_classes)."""
        return self.head(feats, self.text_embeddings())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @property
    def cam_layer(self) -> nn.Module:
        """The module whose output is a convolutional feature map (B, C, h, w): Grad-CAM's target.
        Graph stem: the trunk's last block (B, w, g, g). Pyramid stem: the backbone stage at the finest HNF patch size (its output feeds both that
        layer's tokens and every deeper level); conv stem: the whole stem."""
        if self.embed.stem_kind == "graph":
            return self.embed.stem.blocks[-1]  # the trunk's last block, on the finest patch grid
        if self.embed.stem_kind == "pyramid":
            stem = self.embed.stem
            return stem.stages[stem.stage_strides.index(stem.finest)]
        if self.embed.stem_kind == "conv":
            return self.embed.stem
        raise AttributeError("hnf.stem linear has no convolutional feature map for Grad-CAM")

    def description_attention(self, x: torch.Tensor) -> torch.Tensor | None:
        """x (B, 1, S, S) -> (B, T) visual-to-text attention over the descriptions (rows sum
        to 1), in the order of the stored text features; None without cross-modal attention."""
        if not isinstance(self.head, CrossModalHead):
            return None
        return self.head.description_attention(self.forward_features(x), self.text_embeddings())



def description_classes(text: TextFeatures, classes: Sequence[str]) -> torch.Tensor:
    """(T,) label of every description: the index of its class name in ``classes`` (the
    prepared data's classes.json, whose order is the label order). Every class must have a
    description and every description a class, else a one-line ValueError names them."""
    label = {name: i for i, name in enumerate(classes)}
    described = set(text.class_names)
    undescribed = [name for name in classes if name not in described]
    unknown = sorted(described - set(label))
    if undescribed or unknown:
        problems = [f"no description of {', '.join(map(repr, undescribed))}"] if undescribed else []
        problems += [f"descriptions of classes the data does not have: {', '.join(map(repr, unknown))}"] if unknown else []
        raise ValueError(f"the text features do not match the data's classes ({'; '.join(problems)}); {REDESCRIBE}")
    return torch.tensor([label[name] for name in text.class_names], dtype=torch.long)


REDESCRIBE = "re-run `dvc repro describe embed_text` for the current data/prepared/classes.json"


@register_model("multifusion")
def multifusion(
    num_classes: int,
    image_size: int,
    hnf: dict[str, Any],
    graph: dict[str, Any],
    fusion: dict[str, Any],
    text: TextFeatures | None = None,
    classes: Sequence[str] | None = None,
) -> MultiFusion:
    """MultiFusion from plain arguments: the ``hnf``, ``graph`` and ``fusion`` sections of
    params.yaml as mappings. ``text`` (the descriptions of ALL classes) and ``classes``
    (names in label order) are required iff ``fusion["text"]``."""
    hnf_cfg = section_from_dict(HNFConfig, hnf, "hnf")
    graph_cfg = section_from_dict(GraphConfig, graph, "graph")
    fusion_cfg = section_from_dict(FusionConfig, fusion, "fusion")
    if not fusion_cfg.text:
        return MultiFusion(num_classes, image_size, hnf_cfg, graph_cfg, fusion_cfg)
    if text is None or classes is None:
        raise ValueError("fusion.text is true but no text features were given; run `dvc repro embed_text` "
                         "(data/text_features/) or set fusion.text: false")
    if len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for {num_classes} classes; check data/prepared/classes.json")
    return MultiFusion(num_classes, image_size, hnf_cfg, graph_cfg, fusion_cfg,
                       text.token_states, text.attention_mask, description_classes(text, classes))
