"""Text classification data: ``text[, text_pair], label`` rows from CSV, TSV or JSONL.

    examples = read_classification("sst2/train.tsv")            # header row names the columns
    labels = label_vocab(examples)                               # sorted label strings
    features = encode_classification(tokenizer, examples, labels, max_length=128)

The column names default to GLUE's: ``sentence`` or ``text`` for the text, ``sentence2`` or
``text_pair`` for an optional second text, ``label`` for the label. Labels are kept as strings
when read and mapped to ids by :func:`encode_classification`, so a dev file with a label the
training file never had is an error that names it.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from functional_llm.data.reading import DataError, read_jsonl, read_text
from functional_llm.data.subword import SubwordTokenizer

__all__ = ["encode_classification", "label_vocab", "read_classification"]

TEXT_COLUMNS = ("text", "sentence", "sentence1", "question")
PAIR_COLUMNS = ("text_pair", "sentence2")


def _pick(columns: Sequence[str], wanted: str | None, defaults: Sequence[str], path: Path) -> Any:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{path}: no column {wanted!r}; columns are {list(columns)}")
        return wanted
    return next((c for c in defaults if c in columns), None)


def read_classification(
    path: str | os.PathLike,
    *,
    text: str | None = None,
    pair: str | None = None,
    label: str = "label",
) -> list[dict[str, str]]:
    """Rows as ``{"text", "label"[, "text_pair"]}`` dicts of strings. The format follows the
    suffix: ``.tsv`` (tab-separated, header row), ``.csv`` (header row), ``.jsonl`` (one object
    per line)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".csv", ".jsonl"):
        raise DataError(f"{path}: expected a .tsv, .csv or .jsonl file")
    if suffix == ".jsonl":
        numbered = read_jsonl(path)
        bad = next((n for n, row in numbered if not isinstance(row, dict)), None)
        if bad is not None:
            raise DataError(f"{path}:{bad}: expected a JSON object per line")
        lines, rows = [n for n, _ in numbered], [row for _, row in numbered]
        columns = list(rows[0]) if rows else []
    else:
        reader = csv.DictReader(
            io.StringIO(read_text(path), newline=""),
            delimiter="\t" if suffix == ".tsv" else ",",
            quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL,
        )
        rows, columns = list(reader), list(reader.fieldnames or [])
        lines = [i + 2 for i in range(len(rows))]  # after the header row
    if not rows:
        raise DataError(f"{path}: no rows")
    text_col = _pick(columns, text, TEXT_COLUMNS, path)
    if text_col is None:
        raise DataError(f"{path}: no text column among {list(columns)}; pass text=")
    label_col = _pick(columns, label, (), path)
    pair_col = _pick(columns, pair, PAIR_COLUMNS, path)
    out = []
    for line, row in zip(lines, rows, strict=True):
        if row.get(text_col) is None or row.get(label_col) is None:
            raise DataError(f"{path}:{line}: the row lacks {text_col!r} or {label_col!r}: {row}")
        example = {"text": str(row[text_col]).strip(), "label": str(row[label_col]).strip()}
        if pair_col is not None:
            example["text_pair"] = str(row[pair_col]).strip()
        out.append(example)
    return out


def label_vocab(examples: Sequence[dict[str, str]]) -> list[str]:
    """The sorted set of labels; a label's id is its index."""
    return sorted({e["label"] for e in examples})


def encode_classification(
    tokenizer: SubwordTokenizer,
    examples: Sequence[dict[str, str]],
    labels: Sequence[str],
    max_length: int = 128,
) -> list[dict[str, Any]]:
    """``{"tokens", "token_types", "label"}`` per example (``[CLS] text [SEP] (pair [SEP])``,
    truncated longest-first), ready for :func:`~functional_llm.data.pad_batch`."""
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for e in examples:
        if e["label"] not in index:
            raise ValueError(f"label {e['label']!r} is not among the known labels {list(labels)}")
        enc = tokenizer.encode_example(e["text"], e.get("text_pair"), max_length=max_length)
        out.append({"tokens": enc.ids, "token_types": enc.token_types, "label": index[e["label"]]})
    return out
