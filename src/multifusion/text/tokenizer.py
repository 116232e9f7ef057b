"""A BERT-style WordPiece tokenizer learnt from the corpus, deterministically.

Lower-casing BERT normaliser, BERT pre-tokeniser (white space and punctuation), WordPiece
with ``##`` continuations, ``[CLS] ... [SEP]`` around every sequence, all from
``tokenizers``; wrapped as a transformers fast tokenizer, so ``save_pretrained`` writes
tokenizer.json + tokenizer_config.json and ``AutoTokenizer.from_pretrained(dir)`` loads it
offline.

The vocabulary is learnt here rather than by ``tokenizers.trainers.WordPieceTrainer``:
that trainer breaks frequency ties by ids drawn from Rust hash-map order, so the same
sentences give a different vocabulary on every call (measured: 8 distinct vocabularies,
475 to 480 entries, in 8 runs on one corpus). The learner below is the same algorithm
(byte-pair merges over word counts, WordPiece-style ``##`` pieces, vocabulary = alphabet
+ merged pieces) with ties broken by the pieces' text.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK]
PREFIX = "##"  # marks a piece that continues a word


def word_counts(sentences: Iterable[str]) -> Counter[str]:
    """Words as BERT sees them: normalised (lower case, no accents), split at spaces and punctuation."""
    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for sentence in sentences:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(sentence)))
    return counts


def learn_wordpiece_vocab(counts: Counter[str], vocab_size: int) -> list[str]:
    """Special tokens, every character as a first and as a ``##`` piece, then merged pieces,
    most frequent pair first (ties: smallest pair text), until ``vocab_size`` entries."""
    alphabet = sorted({ch for word in counts for ch in word})
    vocab = SPECIAL_TOKENS + alphabet + [PREFIX + ch for ch in alphabet]
    if vocab_size < len(vocab):
        raise ValueError(
            f"text.vocab_size = {vocab_size} is smaller than the {len(vocab)} special tokens and characters "
            "of the descriptions; raise text.vocab_size in params.yaml"
        )
    known = set(vocab)
    words = sorted(counts)                                              # a fixed order for everything below
    pieces = [[w[0]] + [PREFIX + ch for ch in w[1:]] for w in words]    # current segmentation of each word
    freq = [counts[w] for w in words]
    pair_count: dict[tuple[str, str], int] = defaultdict(int)
    pair_words: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, segs in enumerate(pieces):
        for pair in zip(segs, segs[1:]):
            pair_count[pair] += freq[i]
            pair_words[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_count.items()]
    heapq.heapify(heap)

    while len(vocab) < vocab_size and heap:
        negative, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -negative:    # stale entry: the count changed since it was pushed
            continue
        left, right = pair
        merged = left + right.removeprefix(PREFIX)
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        touched: set[tuple[str, str]] = set()
        for i in sorted(pair_words.pop(pair)):
            segs = pieces[i]
            for old in zip(segs, segs[1:]):
                pair_count[old] -= freq[i]
                touched.add(old)
            new: list[str] = []
            j = 0
            while j < len(segs):
                if j + 1 < len(segs) and segs[j] == left and segs[j + 1] == right:
                    new.append(merged)
                    j += 2
                else:
                    new.append(segs[j])
                    j += 1
            pieces[i] = new
            for fresh in zip(new, new[1:]):
                pair_count[fresh] += freq[i]
                pair_words[fresh].add(i)
                touched.add(fresh)
        for changed in sorted(touched):
            if pair_count[changed] > 0:
                heapq.heappush(heap, (-pair_count[changed], changed))
            else:
                del pair_count[changed]
    return vocab


def train_wordpiece(sentences: Iterable[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A WordPiece tokenizer with at most ``vocab_size`` entries learnt from ``sentences``."""
    vocab = learn_wordpiece_vocab(word_counts(sentences), vocab_size)
    tokenizer = Tokenizer(
        models.WordPiece(vocab={token: i for i, token in enumerate(vocab)}, unk_token=UNK, continuing_subword_prefix=PREFIX)
    )
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix=PREFIX)
    cls_id, sep_id = vocab.index(CLS), vocab.index(SEP)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, cls_id), (SEP, sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=UNK,
        pad_token=PAD,
        cls_token=CLS,
        sep_token=SEP,
        mask_token=MASK,
        model_max_length=max_length,
    )
