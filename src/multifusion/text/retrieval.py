"""Description retrieval: does the text LM put descriptions of one class near each other?

For every description, its nearest other description by cosine similarity of the
sentence embeddings (the mean of the LM's last hidden states over real tokens, as the
SentenceTransformer of stage embed_text computes them); the score is the fraction whose
neighbour belongs to the same class. An LM that knows the language scores high on the
curated NFFA texts; a random one scores near chance (about (n_c - 1) / (N - 1)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def mean_pooled_embeddings(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, batch_size: int
) -> torch.Tensor:
    """(T, D) mean of ``model.base_model``'s last hidden states over each text's real tokens."""
    encoder = model.base_model
    was_training = encoder.training
    encoder.eval()
    pooled = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        hidden = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state  # (b, L, D)
        mask = enc["attention_mask"][..., None].to(hidden.dtype)                                                 # (b, L, 1)
        pooled.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))                                       # (b, D)
    encoder.train(was_training)
    return torch.cat(pooled).float()


def nearest_neighbour_accuracy(embeddings: torch.Tensor, labels: list[str]) -> float:
    """Fraction of rows of ``embeddings`` (T, D) whose most cosine-similar other row has the same label."""
    if embeddings.shape[0] != len(labels) or len(labels) < 2:
        raise ValueError(f"need one label per embedding and at least 2 rows, got {embeddings.shape[0]} rows, {len(labels)} labels")
    unit = F.normalize(embeddings.double(), dim=-1)  # (T, D)
    similarity = unit @ unit.T                       # (T, T)
    similarity.fill_diagonal_(float("-inf"))         # a description is not its own neighbour
    nearest = similarity.argmax(dim=1).tolist()      # (T,)
    return sum(labels[i] == labels[j] for i, j in enumerate(nearest)) / len(labels)


def retrieval_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], labels: list[str], max_length: int, batch_size: int
) -> float:
    """Same-class nearest-neighbour accuracy of the descriptions ``texts`` under ``model``."""
    return nearest_neighbour_accuracy(mean_pooled_embeddings(model, tokenizer, texts, max_length, batch_size), labels)
