"""Benchmark: the text side on the curated descriptions (or any descriptions.parquet).

    python bench/text_lm.py [--descriptions data/descriptions.parquet] [--steps 50]

1. WordPiece vocabulary: the deterministic learner of multifusion.text.tokenizer against
   its peer, ``tokenizers``' WordPieceTrainer (Rust, but not reproducible), on the same
   sentences at text.vocab_size; also how many distinct vocabularies 5 runs of each give.
2. MLM training steps/s of the LM at text.* with text.threads threads against torch's
   default thread count (the peer), same seed, same batches.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from multifusion.config import load_config
from multifusion.text.corpus import build_corpus, load_descriptions
from multifusion.text.pretrain import cpu_threads, pretrain
from multifusion.text.tokenizer import SPECIAL_TOKENS, train_wordpiece

REPO = Path(__file__).resolve().parents[1]


def hf_wordpiece(sentences: list[str], vocab_size: int) -> dict[str, int]:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(sentences, trainer=trainer)
    return tokenizer.get_vocab()


def timed(fn, repeats: int) -> tuple[float, int]:
    """Best wall time of ``repeats`` calls, and how many distinct vocabularies they returned."""
    best, digests = float("inf"), set()
    for _ in range(repeats):
        start = time.perf_counter()
        vocab = fn()
        best = min(best, time.perf_counter() - start)
        digests.add(hashlib.sha256(repr(sorted(vocab.items())).encode()).hexdigest())
    return best, len(digests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--descriptions", type=Path, default=REPO / "data/descriptions.parquet")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    cfg = load_config(REPO / "params.yaml")
    corpus = build_corpus(load_descriptions(args.descriptions), cfg.text.heldout, cfg.seed)
    n = cfg.text.vocab_size

    ours, ours_distinct = timed(lambda: train_wordpiece(corpus.train, n, cfg.text.max_length).get_vocab(), 5)
    peer, peer_distinct = timed(lambda: hf_wordpiece(corpus.train, n), 5)
    print(f"WordPiece vocabulary, {len(corpus.train)} sentences, vocab_size {n}")
    print(f"{'learner':<34}{'best s':>10}{'distinct vocabs / 5':>22}")
    print(f"{'multifusion (deterministic)':<34}{ours:>10.4f}{ours_distinct:>22}")
    print(f"{'tokenizers WordPieceTrainer':<34}{peer:>10.4f}{peer_distinct:>22}")
    print(f"ratio ours/peer: {ours / peer:.2f}x time\n")

    default_threads = torch.get_num_threads()
    rows = []
    for threads in (cfg.text.threads, 0):
        text = load_config(REPO / "params.yaml", {"text.steps": args.steps, "text.threads": threads}).text
        with cpu_threads(threads):
            used = torch.get_num_threads()
        result = pretrain(text, cfg.seed, corpus)
        rows.append((f"{used} thread(s)" + (" (torch default)" if threads == 0 else " (text.threads)"), args.steps / result.seconds))
    print(f"MLM pretraining, {args.steps} steps, batch {cfg.text.batch_size}, hidden {cfg.text.hidden}, torch default {default_threads} threads")
    print(f"{'threads':<34}{'steps/s':>10}")
    for name, rate in rows:
        print(f"{name:<34}{rate:>10.2f}")
    print(f"ratio text.threads / default: {rows[0][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()
