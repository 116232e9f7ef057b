"""Stage embed_text: package the text LM as a SentenceTransformer and embed every description.

    python stages/embed_text.py --lm models/text_lm --descriptions data/descriptions.parquet \
        --encoder models/text_encoder --features data/text_features
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, whatever the shell says

import torch  # noqa: E402

from multifusion.core.errors import run_stage  # noqa: E402
from multifusion.core.config import load_config  # noqa: E402
from multifusion.core.runtime import cpu_threads  # noqa: E402
from multifusion.text.corpus import load_descriptions  # noqa: E402
from multifusion.text.encoder import build_sentence_encoder, save_sentence_encoder, text_features  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm", type=Path, default=Path("models/text_lm"))
    parser.add_argument("--descriptions", type=Path, default=Path("data/descriptions.parquet"))
    parser.add_argument("--encoder", type=Path, default=Path("models/text_encoder"))
    parser.add_argument("--features", type=Path, default=Path("data/text_features"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()

    cfg = load_config(args.params)
    descriptions = load_descriptions(args.descriptions)
    torch.manual_seed(cfg.seed)  # the unused pooler layer a BertForMaskedLM lacks is initialised reproducibly
    encoder = build_sentence_encoder(args.lm, cfg.text.max_length)
    save_sentence_encoder(encoder, args.encoder)
    with cpu_threads(cfg.text.threads):
        features = text_features(encoder, descriptions, cfg.text.batch_size)
    features.save(args.features)
    T, L, D = features.token_states.shape
    print(f"embed_text: {T} descriptions x {L} tokens x {D} dims -> {args.features}; encoder -> {args.encoder}")


if __name__ == "__main__":
    run_stage("embed_text", main)
