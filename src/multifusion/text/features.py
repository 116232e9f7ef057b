"""Text features of the class descriptions, as the classifier consumes them.

One row per description (class x template x sample): the LM's token states and their
mask; the classifier attention-pools the token states itself (trained end to end).
Stored as ``features.safetensors`` + ``index.parquet`` in one directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from multifusion.core.atomic import atomic_path

TENSORS = "features.safetensors"
INDEX = "index.parquet"


@dataclass
class TextFeatures:
    token_states: torch.Tensor         # (T, L, D) float32, last hidden states of the LM, zeros at padding
    attention_mask: torch.Tensor       # (T, L) bool, True at real tokens
    class_names: list[str]             # (T,) class of each description
    templates: list[str]               # (T,)
    samples: list[int]                 # (T,)

    def __post_init__(self) -> None:
        if self.token_states.ndim != 3:
            raise ValueError(f"token_states must be (T, L, D), got {tuple(self.token_states.shape)}; re-run `dvc repro embed_text`")
        T, L, _ = self.token_states.shape
        if tuple(self.attention_mask.shape) != (T, L) or not len(self.class_names) == len(self.templates) == len(self.samples) == T:
            raise ValueError(
                f"text features disagree in size: token_states {tuple(self.token_states.shape)}, attention_mask "
                f"{tuple(self.attention_mask.shape)}, {len(self.class_names)} class names, {len(self.templates)} templates, "
                f"{len(self.samples)} samples; re-run `dvc repro embed_text`"
            )

    @property
    def dim(self) -> int:
        return self.token_states.shape[-1]

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        with atomic_path(directory / TENSORS) as tmp:
            save_file(
                {
                    "token_states": self.token_states.contiguous().float(),
                    "attention_mask": self.attention_mask.to(torch.uint8).contiguous(),
                },
                str(tmp),
            )
        with atomic_path(directory / INDEX) as tmp:
            pd.DataFrame({"class_name": self.class_names, "template": self.templates, "sample": self.samples}).to_parquet(
                tmp, index=False
            )

    @classmethod
    def load(cls, directory: str | Path) -> "TextFeatures":
        directory = Path(directory)
        if not (directory / TENSORS).is_file():
            raise FileNotFoundError(f"{directory / TENSORS}: no text features; run `dvc repro embed_text` first")
        tensors = load_file(str(directory / TENSORS))
        index = pd.read_parquet(directory / INDEX)
        return cls(
            token_states=tensors["token_states"],
            attention_mask=tensors["attention_mask"].bool(),
            class_names=index["class_name"].astype(str).tolist(),
            templates=index["template"].astype(str).tolist(),
            samples=index["sample"].astype(int).tolist(),
        )


def random_text_features(
    classes: Sequence[str], templates: Sequence[str] = ("t0", "t1"), length: int = 8, dim: int = 16, seed: int = 0
) -> TextFeatures:
    """Text features of the layout ``embed_text`` writes, with random values: for tests and
    benchmarks of the model without a text LM.

    One description per class and template, grouped by class as ``describe`` writes them;
    description t has 1 + t % length real tokens, zeros at padding. token_states (T, L, D)
    ~ N(0, 1) from a generator seeded with ``seed`` (the global RNG is left alone),
    T = len(classes) * len(templates), L = length, D = dim.
    """
    gen = torch.Generator().manual_seed(seed)
    T = len(classes) * len(templates)
    lengths = 1 + torch.arange(T) % length  # (T,) in 1..L
    mask = torch.arange(length)[None, :] < lengths[:, None]  # (T, L)
    states = torch.randn(T, length, dim, generator=gen) * mask[..., None]  # (T, L, D)
    return TextFeatures(
        token_states=states,
        attention_mask=mask,
        class_names=[c for c in classes for _ in templates],
        templates=[t for _ in classes for t in templates],
        samples=[0] * T,
    )
