"""The pretraining corpus: sentences of the LLM's class descriptions.

``data/descriptions.parquet`` holds one row per (class, template, sample) with the raw
LLM ``response`` and the extracted final ``description``. The small LM is pretrained on
the sentences of both columns, de-duplicated (a description usually repeats the end of
its response) and split, seeded, into training and held-out sentences so that no
held-out sentence is ever seen in training.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

DESCRIPTION_COLUMNS = ("class_name", "template", "sample", "response", "description")

# A sentence ends at . ! or ? followed by white space and an upper-case letter, a digit
# or an opening bracket/quote; line breaks (bullets, headings) end a sentence too.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])|\n+")
_LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022]+|\d+[.)]|#+)\s*")
MIN_SENTENCE_WORDS = 3


@dataclass(frozen=True)
class Corpus:
    train: list[str]    # training sentences
    heldout: list[str]  # held-out sentences, disjoint from train


def load_descriptions(path: str | Path) -> pd.DataFrame:
    """Read descriptions.parquet and check the columns the text stages need."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: descriptions not found; run `dvc repro describe` first")
    frame = pd.read_parquet(path)
    missing = [c for c in DESCRIPTION_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; rebuild it with `dvc repro describe`")
    if frame.empty:
        raise ValueError(f"{path}: no descriptions; check llm.templates and the classes file, then rerun describe")
    empty = frame["description"].isna() | (frame["description"].astype(str).str.strip() == "")
    if empty.any():
        first = frame.loc[empty].iloc[0]
        raise ValueError(
            f"{path}: {int(empty.sum())} empty description(s), e.g. class {first['class_name']!r} "
            f"template {first['template']!r}; rerun describe (failed requests are not cached)"
        )
    return frame.reset_index(drop=True)


def split_sentences(text: str) -> list[str]:
    """Split free text into sentences of at least ``MIN_SENTENCE_WORDS`` words."""
    sentences = []
    for piece in _SENTENCE_END.split(text):
        sentence = " ".join(_LIST_MARKER.sub("", piece).split())
        if len(sentence.split()) >= MIN_SENTENCE_WORDS:
            sentences.append(sentence)
    return sentences


def build_corpus(frame: pd.DataFrame, heldout: float, seed: int) -> Corpus:
    """Unique sentences of every response and description, split seeded into train/held-out."""
    if not 0.0 < heldout < 1.0:
        raise ValueError(f"text.heldout must be in (0, 1), got {heldout}; set it in params.yaml")
    unique: dict[str, None] = {}  # insertion-ordered set: the order is the parquet's
    for column in ("response", "description"):
        for text in frame[column].fillna("").astype(str):
            for sentence in split_sentences(text):
                unique.setdefault(sentence, None)
    sentences = list(unique)
    if len(sentences) < 2:
        raise ValueError(f"only {len(sentences)} sentence(s) in the descriptions; the LM needs at least 2 to hold one out")
    random.Random(seed).shuffle(sentences)
    n_heldout = min(len(sentences) - 1, max(1, round(heldout * len(sentences))))
    return Corpus(train=sentences[n_heldout:], heldout=sentences[:n_heldout])
