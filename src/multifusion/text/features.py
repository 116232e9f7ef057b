"""Text features of the class descriptions, as the classifier consumes them.

One row per description (class x template x sample). The classifier attention-pools the
token states itself (trained end to end); the sentence embeddings serve baselines and
inspection. Stored as ``features.safetensors`` + ``index.parquet`` in one directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

TENSORS = "features.safetensors"
INDEX = "index.parquet"


@dataclass
class TextFeatures:
    token_states: torch.Tensor         # (T, L, D) float32, last hidden states of the LM
    attention_mask: torch.Tensor       # (T, L) bool, True at real tokens
    sentence_embeddings: torch.Tensor  # (T, D) float32, mean-pooled over real tokens
    class_names: list[str]             # (T,) class of each description
    templates: list[str]               # (T,)
    samples: list[int]                 # (T,)

    def __post_init__(self) -> None:
        T, L, _ = self.token_states.shape
        assert self.attention_mask.shape == (T, L), "attention_mask must be (T, L)"
        assert self.sentence_embeddings.shape[0] == T, "sentence_embeddings must be (T, D)"
        assert len(self.class_names) == len(self.templates) == len(self.samples) == T

    @property
    def dim(self) -> int:
        return self.token_states.shape[-1]

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {
                "token_states": self.token_states.contiguous().float(),
                "attention_mask": self.attention_mask.to(torch.uint8).contiguous(),
                "sentence_embeddings": self.sentence_embeddings.contiguous().float(),
            },
            str(directory / TENSORS),
        )
        pd.DataFrame({"class_name": self.class_names, "template": self.templates, "sample": self.samples}).to_parquet(
            directory / INDEX, index=False
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
            sentence_embeddings=tensors["sentence_embeddings"],
            class_names=index["class_name"].astype(str).tolist(),
            templates=index["template"].astype(str).tolist(),
            samples=index["sample"].astype(int).tolist(),
        )
