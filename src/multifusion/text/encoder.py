"""The pretrained LM packaged as a SentenceTransformer, and the text features it yields.

The encoder is ``Transformer`` (the LM's last hidden states) + mean ``Pooling``, saved
without a model card so that saving never reaches the hub; ``SentenceTransformer(dir)``
loads it offline. :func:`text_features` runs every description through that same
encoder and keeps, per description, the token states the classifier attention-pools
and the attention mask.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

from multifusion.core.atomic import atomic_folder
from multifusion.text.features import TextFeatures
from multifusion.text.pretrain import quiet_load_report


def build_sentence_encoder(lm_dir: str | Path, max_length: int) -> SentenceTransformer:
    """Transformer + mean pooling over the LM saved in ``lm_dir`` (the MLM head is dropped).

    A checkpoint without a pooler layer (BertForMaskedLM) gets a freshly initialised one
    that mean pooling never uses; seed torch beforehand for byte-identical output.
    """
    lm_dir = Path(lm_dir)
    if not (lm_dir / "config.json").is_file():
        raise FileNotFoundError(f"{lm_dir}: no pretrained text LM (config.json missing); run `dvc repro pretrain_lm` first")
    with quiet_load_report():  # expected: the MLM head is not loaded, the pooler is new
        transformer = Transformer(str(lm_dir), max_seq_length=max_length)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    return SentenceTransformer(modules=[transformer, pooling], device="cpu")


def save_sentence_encoder(encoder: SentenceTransformer, directory: str | Path) -> None:
    """Save for ``SentenceTransformer(directory)``; no model card, so nothing goes online."""
    with atomic_folder(directory) as staging:  # the whole folder or the previous one
        encoder.save(str(staging), create_model_card=False)


@torch.no_grad()
def text_features(encoder: SentenceTransformer, descriptions: pd.DataFrame, batch_size: int) -> TextFeatures:
    """Features of ``descriptions['description']``, in the frame's row order.

    All descriptions are tokenised together, so every row is padded to one length L: the
    longest description, at most the encoder's ``max_seq_length`` tokens.
    """
    encoder.eval()
    texts = descriptions["description"].astype(str).tolist()
    inputs = encoder.preprocess(texts)                                   # input_ids, attention_mask: (T, L)
    T = len(texts)
    token_states = []
    for start in range(0, T, batch_size):
        chunk = {k: v[start : start + batch_size] if torch.is_tensor(v) else v for k, v in inputs.items()}
        out = encoder(chunk)
        token_states.append(out["token_embeddings"].float())              # (b, L, D)
    attention_mask = inputs["attention_mask"].bool()                      # (T, L)
    states = torch.cat(token_states) * attention_mask[..., None]          # (T, L, D), zeros at padding
    return TextFeatures(
        token_states=states,
        attention_mask=attention_mask,
        class_names=descriptions["class_name"].astype(str).tolist(),
        templates=descriptions["template"].astype(str).tolist(),
        samples=descriptions["sample"].astype(int).tolist(),
    )
