"""Masked-language-model pretraining of the text LM on the description sentences.

From a pretrained base (default: all-MiniLM-L6-v2, materialised by stage base_lm, see
:mod:`multifusion.text.base`): that encoder and its own WordPiece tokenizer, with a
masked-LM head (fresh when the base has none), pretraining continued on the
descriptions (domain adaptation). The head is fitted first for ``text.head_steps`` steps
with the encoder frozen, so that a random head's gradients never reach the pretrained
encoder (linear probing before fine-tuning); "before" is the held-out perplexity of the
base encoder with that fitted head, "after" the one after ``text.steps`` steps of the
whole model. From scratch (``text.base_model: null``): a WordPiece tokenizer trained on
the training sentences and a ``BertForMaskedLM`` sized by ``text.*``; there "before" is
the untrained model.

Held-out perplexity is exp(mean cross-entropy over masked held-out tokens), with one
fixed set of masks, so the figures of one run are comparable (across vocabularies they
are not). The MLM head runs on the masked positions only: the other positions carry no
loss, and the vocabulary projection is most of a small model's compute.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from multifusion.core.atomic import atomic_folder
from multifusion.core.config import TextConfig
from multifusion.core.optim import optimizer_step, warmup_linear
from multifusion.core.runtime import cpu_threads
from multifusion.text.base import BaseModelError
from multifusion.text.corpus import Corpus
from multifusion.text.masking import IGNORE_INDEX, mask_tokens
from multifusion.text.tokenizer import train_wordpiece

EVAL_POINTS = 10  # held-out perplexity is measured this many times during training

LogFn = Callable[[int, dict[str, float]], None]
ProbeFn = Callable[[PreTrainedModel, PreTrainedTokenizerBase], dict[str, float]]  # e.g. retrieval accuracy


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
    perplexity_initial: float  # as loaded (a fresh head on a pretrained base is untrained)
    perplexity_before: float   # after the head fit (= initial from scratch)
    perplexity_after: float
    steps: int
    head_steps: int
    train_sentences: int
    heldout_sentences: int
    seconds: float
    probe_before: dict[str, float] = field(default_factory=dict)
    probe_after: dict[str, float] = field(default_factory=dict)


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
def quiet_load_report() -> Iterator[None]:
    """Silence transformers' per-key load table (expected here: a fresh MLM head, an unused
    pooler, a dropped MLM head), keeping errors."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


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


def load_base_model(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A masked LM on the pretrained encoder in ``path`` and its own tokenizer (never the hub).

    A base without an MLM head (a sentence encoder such as all-MiniLM-L6-v2) gets a fresh
    one; every encoder weight must load, else the directory is refused.
    """
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"text.base_model: {directory} is not a local Hugging Face model directory (no config.json); "
            "set it to null to pretrain from scratch, or to a directory saved with save_pretrained"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    with quiet_load_report():  # the one-line report below replaces the library's table
        model, info = AutoModelForMaskedLM.from_pretrained(str(directory), local_files_only=True, output_loading_info=True)
    prefix = model.base_model_prefix + "."
    encoder_missing = sorted(k for k in info["missing_keys"] if k.startswith(prefix))
    if encoder_missing or info["mismatched_keys"]:
        bad = (encoder_missing or sorted(map(str, info["mismatched_keys"])))[0]
        raise BaseModelError(f"text.base_model: {directory}: encoder weight {bad} missing or of the wrong shape; it is not a complete pretrained model")
    if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError(f"text.base_model: the tokenizer in {directory} has no mask or pad token; it cannot do MLM")
    fresh = len(info["missing_keys"])
    print(f"text LM base {directory}: {type(model).__name__}, {'a fresh MLM head (' + str(fresh) + ' tensors)' if fresh else 'its own MLM head'}")
    return model, tokenizer


def head_parameters(model: PreTrainedModel) -> list[torch.nn.Parameter]:
    """The MLM head's own parameters (a decoder tied to the input embeddings is the encoder's)."""
    prefix = model.base_model_prefix + "."
    return [p for name, p in model.named_parameters() if not name.startswith(prefix)]


def bucketed_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of indices: each epoch a fresh permutation, sorted by length and cut
    into ceil(N / batch_size) near-equal batches of similar lengths (little padding),
    served in random order."""
    n = len(lengths)
    n_batches = max(1, math.ceil(n / batch_size))
    while True:
        order = sorted(torch.randperm(n, generator=generator).tolist(), key=lambda i: lengths[i])  # stable: ties keep the draw
        chunks = [order[k * n // n_batches : (k + 1) * n // n_batches] for k in range(n_batches)]
        for k in torch.randperm(n_batches, generator=generator).tolist():
            yield chunks[k]


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


def masked_logits(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """MLM logits at the ``selected`` positions only: input_ids, attention_mask, selected (B, L) -> (M, V)."""
    if isinstance(model, BertForMaskedLM):
        hidden = model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        return model.cls(hidden[selected])                                                          # (M, V)
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[selected]              # any other masked LM


def mlm_loss(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the masked positions. input_ids, attention_mask, labels: (B, L)."""
    selected = labels != IGNORE_INDEX                                                                # (B, L)
    return F.cross_entropy(masked_logits(model, input_ids, attention_mask, selected), labels[selected], reduction=reduction)


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


@dataclass
class Phase:
    """One stretch of AdamW steps on some parameters: linear warm-up, then linear decay to zero."""

    log_prefix: str  # of the logged loss and lr: "head_" for the head fit, "" for the whole model
    parameters: list[torch.nn.Parameter]
    steps: int
    lr: float
    first_step: int  # global step number of this phase's first step (for the log)


def run_phase(
    phase: Phase, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train: SentenceBatcher,
    batches: Iterator[list[int]], heldout: list, text: TextConfig, generator: torch.Generator, log: LogFn | None,
) -> None:
    """``phase.steps`` MLM steps updating ``phase.parameters`` only; the rest of the model is frozen meanwhile."""
    trainable = {id(p) for p in phase.parameters}
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    optimizer = torch.optim.AdamW(phase.parameters, lr=phase.lr, weight_decay=text.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(min(text.warmup_steps, phase.steps), phase.steps))
    eval_every = max(1, phase.steps // EVAL_POINTS)
    running, running_n = 0.0, 0
    model.train()
    for step in range(1, phase.steps + 1):
        batch = train.batch(next(batches))
        masked, labels = mask_tokens(
            batch.input_ids, batch.word_ids, batch.special, text.mask_prob, text.whole_word_mask,
            tokenizer.mask_token_id, len(tokenizer), generator,
        )
        loss = mlm_loss(model, masked, batch.attention_mask, labels)
        optimizer_step(loss, optimizer, scheduler, phase.parameters, text.grad_clip)
        running, running_n = running + loss.item(), running_n + 1
        if log is not None and (step % eval_every == 0 or step == phase.steps):
            metrics = {"mlm_loss": running / running_n, "heldout_perplexity": heldout_perplexity(model, heldout), "lr": scheduler.get_last_lr()[0]}
            log(phase.first_step + step - 1, {(phase.log_prefix + k if k != "heldout_perplexity" else k): v for k, v in metrics.items()})
            running, running_n = 0.0, 0
    for name, p in model.named_parameters():
        p.requires_grad_(saved[name])


def pretrain(
    text: TextConfig, seed: int, corpus: Corpus, base_dir: str | Path | None = None,
    log: LogFn | None = None, probe: ProbeFn | None = None,
) -> PretrainResult:
    """MLM-pretrain the text LM: continued from the base in ``base_dir`` (a directory
    materialised by stage base_lm, or any local HF model), or from scratch when None.
    Deterministic for a given ``seed``. ``probe(model, tokenizer)`` is measured before
    and after training (e.g. description retrieval)."""
    with cpu_threads(text.threads):
        return _pretrain(text, seed, corpus, base_dir, log, probe)


def _pretrain(text: TextConfig, seed: int, corpus: Corpus, base_dir: str | Path | None, log: LogFn | None, probe: ProbeFn | None) -> PretrainResult:
    started = time.perf_counter()
    torch.manual_seed(seed)  # the fresh head (or the whole model from scratch) is initialised reproducibly
    if base_dir is None:
        model, tokenizer = build_from_scratch(text, corpus.train)
    else:
        model, tokenizer = load_base_model(base_dir)
    model.eval()
    probe_before = probe(model, tokenizer) if probe is not None else {}
    train = SentenceBatcher(tokenizer, corpus.train, text.max_length)
    heldout = fixed_masked_batches(SentenceBatcher(tokenizer, corpus.heldout, text.max_length), tokenizer, text, seed + 1)
    generator = torch.Generator().manual_seed(seed)
    batches = bucketed_batches([len(ids) for ids in train.input_ids], text.batch_size, generator)

    perplexity_initial = heldout_perplexity(model, heldout)
    if log is not None:
        log(0, {"heldout_perplexity": perplexity_initial})
    head_steps = text.head_steps if base_dir is not None else 0
    if head_steps:
        head = Phase("head_", head_parameters(model), head_steps, text.head_lr, first_step=1)
        run_phase(head, model, tokenizer, train, batches, heldout, text, generator, log)
    perplexity_before = heldout_perplexity(model, heldout) if head_steps else perplexity_initial
    whole = Phase("", [p for p in model.parameters()], text.steps, text.lr, first_step=head_steps + 1)
    run_phase(whole, model, tokenizer, train, batches, heldout, text, generator, log)
    model.eval()
    return PretrainResult(
        model=model,
        tokenizer=tokenizer,
        perplexity_initial=perplexity_initial,
        perplexity_before=perplexity_before,
        perplexity_after=heldout_perplexity(model, heldout),
        steps=text.steps,
        head_steps=head_steps,
        train_sentences=len(corpus.train),
        heldout_sentences=len(corpus.heldout),
        seconds=time.perf_counter() - started,
        probe_before=probe_before,
        probe_after=probe(model, tokenizer) if probe is not None else {},
    )


def save_lm(result: PretrainResult, directory: str | Path) -> None:
    """Model + tokenizer, loadable offline with AutoModel(ForMaskedLM) / AutoTokenizer."""
    with atomic_folder(directory) as staging:  # the whole folder or the previous one
        result.model.save_pretrained(str(staging))
        result.tokenizer.save_pretrained(str(staging))
