"""Sequence labelling data: CoNLL files, BIO / BIOES tag schemes, and sub-word label alignment.

A CoNLL file has one token per line (the word first, its tag last, whitespace-separated), a
blank line between sentences, and optional ``-DOCSTART-`` lines. A word split into several
sub-words is labelled once, at its first piece; its other pieces, the special tokens and the
padding get ``IGNORE``, so the loss and the metrics count each word exactly once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from functional_llm.data.reading import DataError, read_text
from functional_llm.data.subword import Encoded, SubwordTokenizer
from functional_llm.types import IGNORE

__all__ = [
    "align_labels",
    "bio_to_bioes",
    "bioes_to_bio",
    "encode_tagging",
    "read_conll",
    "word_predictions",
]

Sentence = tuple[list[str], list[str]]  # (words, tags)


def read_conll(path: str | os.PathLike) -> list[Sentence]:
    """``(words, tags)`` per sentence; the tag is each line's last column. A file without a
    sentence is an error (``DataError``), as is a line with a word but no tag."""
    sentences: list[Sentence] = []
    words: list[str] = []
    tags: list[str] = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if words:
                sentences.append((words, tags))
                words, tags = [], []
            continue
        if len(fields) < 2:
            raise DataError(f"{path}:{number}: expected 'word ... tag', got {line!r}")
        words.append(fields[0])
        tags.append(fields[-1])
    if words:
        sentences.append((words, tags))
    if not sentences:
        raise DataError(f"{path}: no sentences (only -DOCSTART- lines and blank lines)")
    return sentences


def _split(tag: str) -> tuple[str, str]:
    prefix, _, kind = tag.partition("-")
    return prefix, kind


def bio_to_bioes(tags: Sequence[str]) -> list[str]:
    """BIO (IOB2) tags to BIOES: a one-word entity is ``S-``, an entity's last word ``E-``."""
    out = []
    for i, tag in enumerate(tags):
        prefix, kind = _split(tag)
        if prefix not in ("B", "I"):
            out.append(tag)
            continue
        continues = i + 1 < len(tags) and tags[i + 1] == f"I-{kind}"
        if prefix == "B":
            out.append(f"B-{kind}" if continues else f"S-{kind}")
        else:
            out.append(f"I-{kind}" if continues else f"E-{kind}")
    return out


def bioes_to_bio(tags: Sequence[str]) -> list[str]:
    """BIOES tags back to BIO: ``S-`` becomes ``B-``, ``E-`` becomes ``I-``."""
    swap = {"S": "B", "E": "I"}
    out = []
    for tag in tags:
        prefix, kind = _split(tag)
        out.append(f"{swap[prefix]}-{kind}" if prefix in swap else tag)
    return out


def align_labels(encoded: Encoded, word_labels: Sequence[int], segment: int = 0) -> np.ndarray:
    """One label per token: ``word_labels[w]`` at the first sub-word of word ``w`` of
    ``segment``, ``IGNORE`` at every other token."""
    out = np.full(len(encoded), IGNORE, dtype=np.int64)
    starts = encoded.word_starts & (encoded.segments == segment)
    out[starts] = np.asarray(word_labels, dtype=np.int64)[encoded.word_ids[starts]]
    return out


def encode_tagging(
    tokenizer: SubwordTokenizer,
    sentences: Sequence[Sentence],
    tags: Sequence[str],
    max_length: int = 128,
) -> list[dict[str, Any]]:
    """``{"tokens", "labels", "word_ids"}`` per sentence (``[CLS] words [SEP]``); words cut off
    by ``max_length`` get no token, and :func:`word_predictions` predicts ``O`` for them."""
    index = {tag: i for i, tag in enumerate(tags)}
    out = []
    for words, word_tags in sentences:
        unknown = set(word_tags) - set(index)
        if unknown:
            raise ValueError(f"tags {sorted(unknown)} are not among the known tags {list(tags)}")
        enc = tokenizer.encode_example(words, max_length=max_length)
        labels = align_labels(enc, [index[t] for t in word_tags])
        out.append({"tokens": enc.ids, "labels": labels, "word_ids": enc.word_ids})
    return out


def word_predictions(
    word_ids: np.ndarray, token_labels: np.ndarray, num_words: int, outside: int
) -> list[int]:
    """Per-word predictions from per-token ones: each word takes its first sub-word's label;
    words with no token (truncated) get ``outside``."""
    out = [outside] * num_words
    seen = set()
    for w, label in zip(
        np.asarray(word_ids).tolist(), np.asarray(token_labels).tolist(), strict=False
    ):
        if 0 <= w < num_words and w not in seen:
            seen.add(w)
            out[w] = label
    return out
