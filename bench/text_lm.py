"""Benchmark: the text side on the curated descriptions (or any descriptions.parquet).

    python bench/text_lm.py [--descriptions data/descriptions.parquet] [--steps 50]

1. WordPiece vocabulary: the deterministic learner of multifusion.text.tokenizer against
   its peer, ``tokenizers``' WordPieceTrainer (Rust, but not reproducible), on the same
   sentences at text.vocab_size; also how many distinct vocabularies 5 runs of each give.
2. MLM training steps/s of the LM at text.* (the default base, all-MiniLM-L6-v2) as
   pretrain_lm runs it (MLM head on the masked positions only, length-bucketed batches,
   text.threads threads) against its peers: the full-sequence logits of
   ``BertForMaskedLM.forward``, unsorted random batches, torch's default thread count.
   Same seed, same number of steps.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from multifusion.core.config import TextConfig, load_config
from multifusion.core.runtime import cpu_threads
from multifusion.text.base import materialise
from multifusion.text.corpus import Corpus, build_corpus, load_descriptions
from multifusion.text.masking import IGNORE_INDEX, mask_tokens
from multifusion.text.pretrain import SentenceBatcher, bucketed_batches, load_base_model, mlm_loss
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


def random_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """The peer of bucketed_batches: each epoch a permutation cut in order (mixed lengths)."""
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        yield from (order[i : i + batch_size] for i in range(0, n, batch_size))


def mlm_steps_per_second(base_dir: Path, corpus: Corpus, text: TextConfig, threads: int, full_logits: bool, bucketed: bool, steps: int) -> float:
    """Whole-model MLM steps/s (AdamW, text.batch_size) on the training sentences."""
    torch.manual_seed(0)
    model, tokenizer = load_base_model(base_dir)
    model.train()
    train = SentenceBatcher(tokenizer, corpus.train, text.max_length)
    generator = torch.Generator().manual_seed(0)
    lengths = [len(ids) for ids in train.input_ids]
    batches = bucketed_batches(lengths, text.batch_size, generator) if bucketed else random_batches(len(lengths), text.batch_size, generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=text.lr)
    with cpu_threads(threads):
        start = time.perf_counter()
        for _ in range(steps):
            batch = train.batch(next(batches))
            masked, labels = mask_tokens(batch.input_ids, batch.word_ids, batch.special, text.mask_prob, False,
                                         tokenizer.mask_token_id, len(tokenizer), generator)
            if full_logits:  # what BertForMaskedLM.forward(labels=...) computes: logits at every position
                logits = model(input_ids=masked, attention_mask=batch.attention_mask).logits  # (B, L, V)
                loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
            else:
                loss = mlm_loss(model, masked, batch.attention_mask, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--descriptions", type=Path, default=REPO / "data/descriptions.parquet")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    cfg = load_config(REPO / "params.yaml")
    corpus = build_corpus(load_descriptions(args.descriptions), cfg.text.heldout, cfg.seed)
    n = cfg.text.vocab_size

    ours, ours_distinct = timed(lambda: train_wordpiece(corpus.train, n, cfg.text.max_length).get_vocab(), 5)
    peer, peer_distinct = timed(lambda: hf_wordpiece(corpus.train, n), 5)
    print(f"WordPiece vocabulary (from-scratch base), {len(corpus.train)} sentences, vocab_size {n}")
    print(f"{'learner':<34}{'best s':>10}{'distinct vocabs / 5':>22}")
    print(f"{'multifusion (deterministic)':<34}{ours:>10.4f}{ours_distinct:>22}")
    print(f"{'tokenizers WordPieceTrainer':<34}{peer:>10.4f}{peer_distinct:>22}")
    print(f"ratio ours/peer: {ours / peer:.2f}x time\n")

    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "base_lm"
        materialise(cfg.text.base_model, base_dir)
        variants = [
            (f"pretrain_lm ({cfg.text.threads} thread)", cfg.text.threads, False, True),
            ("full-sequence logits", cfg.text.threads, True, True),
            ("unsorted batches", cfg.text.threads, False, False),
            (f"torch default threads ({torch.get_num_threads()})", 0, False, True),
        ]
        rows = [(name, mlm_steps_per_second(base_dir, corpus, cfg.text, threads, full, bucketed, args.steps))
                for name, threads, full, bucketed in variants]
    print(f"MLM steps on {cfg.text.base_model}, {args.steps} steps, batch {cfg.text.batch_size}")
    print(f"{'variant':<34}{'steps/s':>10}{'pretrain_lm / variant':>24}")
    for name, rate in rows:
        print(f"{name:<34}{rate:>10.3f}{rows[0][1] / rate:>24.2f}")


if __name__ == "__main__":
    main()
