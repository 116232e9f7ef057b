"""Masked-language-model pretraining of the small text LM on the description sentences.

From scratch (default): a WordPiece tokenizer trained on the training sentences and a
``BertForMaskedLM`` sized by ``text.*``. With ``text.base_model`` set to a local Hugging
Face checkpoint (BERT, DeBERTa, ...): that model and its own tokenizer, pretraining
continued on the descriptions (domain adaptation). Held-out perplexity is
exp(mean cross-entropy over masked held-out tokens), with one fixed set of masks, so the
figures before and after training are comparable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from multifusion.config import TextConfig
from multifusion.text.corpus import Corpus
from multifusion.text.masking import IGNORE_INDEX, mask_tokens
from multifusion.text.tokenizer import train_wordpiece

EVAL_POINTS = 10  # held-out perplexity is measured this many times during training

LogFn = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor       # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long, 1 at real tokens
    word_ids: torch.Tensor        # (B, L) long, -1 at special tokens and padding
    special: torch.Tensor         # (B, L) bool, True at [CLS]/[SEP]/padding


@dataclass
class PretrainResult:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    perplexity_before: float
    perplexity_after: float
    steps: int
    train_sentences: int
    heldout_sentences: int
    seconds: float


class SentenceBatcher:
    """Tokenise sentences once; hand out padded batches of any subset."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, sentences: list[str], max_length: int) -> None:
        encoded = tokenizer(sentences, truncation=True, max_length=max_length, return_special_tokens_mask=True)
        self.input_ids: list[list[int]] = encoded["input_ids"]
        self.special: list[list[int]] = encoded["special_tokens_mask"]
        self.word_ids = [[-1 if w is None else w for w in encoded.word_ids(i)] for i in range(len(sentences))]
        self.pad_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices: list[int]) -> Batch:
        L = max(len(self.input_ids[i]) for i in indices)
        B = len(indices)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(B, L, dtype=torch.long)
        word_ids = torch.full((B, L), -1, dtype=torch.long)
        special = torch.ones(B, L, dtype=torch.bool)
        for row, i in enumerate(indices):
            n = len(self.input_ids[i])
            input_ids[row, :n] = torch.tensor(self.input_ids[i])
            attention_mask[row, :n] = 1
            word_ids[row, :n] = torch.tensor(self.word_ids[i])
            special[row, :n] = torch.tensor(self.special[i], dtype=torch.bool)
        return Batch(input_ids, attention_mask, word_ids, special)


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op CPU threads (0: leave torch's setting), then restore it.

    The LM's matrices are small: extra threads gain little, and on a shared machine
    they spin against each other (measured here: 30 steps in 1.3 s on 1 thread, 26 s on
    2 under load). A fixed count also keeps float reductions, so outputs, reproducible.
    """
    previous = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build_from_scratch(text: TextConfig, train_sentences: list[str]) -> tuple[BertForMaskedLM, PreTrainedTokenizerBase]:
    """A WordPiece tokenizer trained on ``train_sentences`` and an untrained BERT sized by ``text``."""
    tokenizer = train_wordpiece(train_sentences, text.vocab_size, text.max_length)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=text.hidden,
        num_hidden_layers=text.layers,
        num_attention_heads=text.heads,
        intermediate_size=text.intermediate,
        max_position_embeddings=text.max_length,
        pad_token_id=tokenizer.pad_token_id,
    )
    return BertForMaskedLM(config), tokenizer


def load_base_model(path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A pretrained masked LM and its tokenizer from a local directory (never the hub)."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"text.base_model: {directory} is not a local Hugging Face model directory (no config.json); "
            "set it to null to pretrain from scratch, or to a directory saved with save_pretrained"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    model = AutoModelForMaskedLM.from_pretrained(str(directory), local_files_only=True)
    if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError(f"text.base_model: the tokenizer in {directory} has no mask or pad token; it cannot do MLM")
    return model, tokenizer


def fixed_masked_batches(
    batcher: SentenceBatcher, tokenizer: PreTrainedTokenizerBase, text: TextConfig, seed: int
) -> list[tuple[Batch, torch.Tensor, torch.Tensor]]:
    """Held-out batches masked once with their own seed: (batch, masked ids (B, L), labels (B, L))."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, len(batcher), text.batch_size):
        batch = batcher.batch(list(range(start, min(start + text.batch_size, len(batcher)))))
        masked, labels = mask_tokens(
            batch.input_ids, batch.word_ids, batch.special, text.mask_prob, text.whole_word_mask,
            tokenizer.mask_token_id, len(tokenizer), generator,
        )
        batches.append((batch, masked, labels))
    return batches


def mlm_loss(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the masked positions. input_ids, attention_mask, labels: (B, L)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, L, V)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)


@torch.no_grad()
def heldout_perplexity(model: PreTrainedModel, batches: list[tuple[Batch, torch.Tensor, torch.Tensor]]) -> float:
    """exp(total NLL / number of masked tokens) over the fixed held-out batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch, masked, labels in batches:
        total += mlm_loss(model, masked, batch.attention_mask, labels, reduction="sum").item()
        count += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return math.exp(total / max(count, 1))


def pretrain(text: TextConfig, seed: int, corpus: Corpus, log: LogFn | None = None) -> PretrainResult:
    """MLM-pretrain the text LM for ``text.steps`` steps; deterministic for a given ``seed``."""
    with cpu_threads(text.threads):
        return _pretrain(text, seed, corpus, log)


def _pretrain(text: TextConfig, seed: int, corpus: Corpus, log: LogFn | None) -> PretrainResult:
    started = time.perf_counter()
    torch.manual_seed(seed)
    if text.base_model is None:
        model, tokenizer = build_from_scratch(text, corpus.train)
    else:
        model, tokenizer = load_base_model(text.base_model)
    train = SentenceBatcher(tokenizer, corpus.train, text.max_length)
    heldout = fixed_masked_batches(SentenceBatcher(tokenizer, corpus.heldout, text.max_length), tokenizer, text, seed + 1)

    perplexity_before = heldout_perplexity(model, heldout)
    if log is not None:
        log(0, {"heldout_perplexity": perplexity_before})

    optimizer = torch.optim.AdamW(model.parameters(), lr=text.lr, weight_decay=text.weight_decay)
    warmup = min(text.warmup_steps, text.steps)

    def lr_factor(step: int) -> float:  # linear warm-up, then linear decay to zero
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (text.steps - step) / max(1, text.steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(seed)
    eval_every = max(1, text.steps // EVAL_POINTS)
    order: list[int] = []
    running, running_n = 0.0, 0
    model.train()
    for step in range(1, text.steps + 1):
        if len(order) < text.batch_size:  # a fresh permutation once the current epoch runs out
            order += torch.randperm(len(train), generator=generator).tolist()
        indices, order = order[: text.batch_size], order[text.batch_size :]
        batch = train.batch(indices)
        masked, labels = mask_tokens(
            batch.input_ids, batch.word_ids, batch.special, text.mask_prob, text.whole_word_mask,
            tokenizer.mask_token_id, len(tokenizer), generator,
        )
        loss = mlm_loss(model, masked, batch.attention_mask, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if text.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), text.grad_clip)
        optimizer.step()
        scheduler.step()
        running, running_n = running + loss.item(), running_n + 1
        if log is not None and (step % eval_every == 0 or step == text.steps):
            log(step, {"mlm_loss": running / running_n, "heldout_perplexity": heldout_perplexity(model, heldout), "lr": scheduler.get_last_lr()[0]})
            running, running_n = 0.0, 0
    model.eval()
    return PretrainResult(
        model=model,
        tokenizer=tokenizer,
        perplexity_before=perplexity_before,
        perplexity_after=heldout_perplexity(model, heldout),
        steps=text.steps,
        train_sentences=len(corpus.train),
        heldout_sentences=len(corpus.heldout),
        seconds=time.perf_counter() - started,
    )


def save_lm(result: PretrainResult, directory: str | Path) -> None:
    """Model + tokenizer, loadable offline with AutoModel(ForMaskedLM) / AutoTokenizer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(str(directory))
    result.tokenizer.save_pretrained(str(directory))
