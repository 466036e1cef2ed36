"""Character- and byte-level tokenizers: exact, reversible, saved as JSON (subword ones live in
:mod:`functional_llm.data.subword`; :func:`load_tokenizer` reads all three kinds, and Hugging
Face ``tokenizer.json`` files).

* :class:`CharTokenizer` gives each character of a training text one id (nanoGPT's
  ``shakespeare_char``: 65 ids for tiny Shakespeare); an unseen character is an error that
  names it and its position.
* :class:`ByteTokenizer` maps UTF-8 bytes to ids 0-255: any text, no training, a fixed
  vocabulary of 256.

Both encode to ``numpy`` arrays (fast on whole corpora) and decode lists, arrays or tensors.
``tokenizer.save(path)`` writes JSON atomically; :func:`load_tokenizer` reads either kind back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from functional_llm.data.reading import DataError, field, read_json
from functional_llm.data.subword import SubwordTokenizer
from functional_llm.files import write_atomic

__all__ = ["ByteTokenizer", "CharTokenizer", "load_tokenizer", "tokenizer_from_json"]

Ids = list[int] | np.ndarray | torch.Tensor


def _as_list(ids: Ids) -> list[int]:
    if isinstance(ids, torch.Tensor):
        return ids.tolist()
    return np.asarray(ids).tolist()


def _write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, ensure_ascii=False).encode("utf-8"))


@dataclass(frozen=True)
class CharTokenizer:
    """One id per character; ``chars[i]`` is the character with id ``i``."""

    chars: str

    def __post_init__(self) -> None:
        if not self.chars or len(set(self.chars)) != len(self.chars):
            raise ValueError("CharTokenizer.chars must be non-empty and without repeats")

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        """The sorted set of characters in ``text``."""
        if not text:
            raise ValueError("CharTokenizer.train: the text is empty; there is nothing to learn")
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        vocab = np.frombuffer(self.chars.encode("utf-32-le"), dtype=np.uint32)
        table = np.full(int(max(vocab.max(), codes.max(initial=0))) + 1, -1, dtype=np.int64)
        table[vocab] = np.arange(len(vocab))
        ids = table[codes]
        if (ids < 0).any():
            at = int(np.argmax(ids < 0))
            raise ValueError(
                f"CharTokenizer: character {text[at]!r} at position {at} is not in the "
                f"vocabulary of {self.vocab_size} characters"
            )
        return ids

    def decode(self, ids: Ids) -> str:
        return "".join(self.chars[i] for i in _as_list(ids))

    def to_json(self) -> dict[str, Any]:
        return {"type": "char", "chars": self.chars}

    def save(self, path: str | os.PathLike) -> None:
        _write_json(path, self.to_json())


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as ids 0-255. Decoding replaces invalid byte sequences with U+FFFD."""

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Ids) -> str:
        return bytes(_as_list(ids)).decode("utf-8", errors="replace")

    def to_json(self) -> dict[str, Any]:
        return {"type": "byte"}

    def save(self, path: str | os.PathLike) -> None:
        _write_json(path, self.to_json())


def load_tokenizer(path: str | os.PathLike) -> CharTokenizer | ByteTokenizer | SubwordTokenizer:
    """Read a tokenizer written by ``save``, or a Hugging Face ``tokenizer.json`` (or the model
    folder that holds one, whose ``special_tokens_map.json`` or ``tokenizer_config.json`` then
    names the special tokens):
    JSON only, nothing is executed. A file that is truncated, of an unknown type or
    inconsistent is a ``DataError`` naming it."""
    path = Path(path)
    roles = None
    if path.is_dir():
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if roles is None and (path / name).exists():
                roles = _roles(read_json(path / name))
        path = path / "tokenizer.json"
    data = read_json(path)
    if isinstance(data, dict) and "model" in data and "added_tokens" in data:
        try:
            return SubwordTokenizer.from_hf(data, roles)
        except Exception as err:
            raise DataError(f"{path}: not a tokenizer we can read ({err})") from None
    return tokenizer_from_json(data, str(path))


def _roles(special_tokens_map: Any) -> dict[str, str]:
    """``{"bos_token": "<s>" | {"content": "<s>", ...}, ...}`` to ``{"bos": "<s>", ...}``."""
    roles = {}
    for name, token in (special_tokens_map or {}).items():
        token = token.get("content") if isinstance(token, dict) else token
        if name.endswith("_token") and isinstance(token, str):
            roles[name.removesuffix("_token")] = token
    return roles


def tokenizer_from_json(
    data: Any, source: str = "tokenizer"
) -> CharTokenizer | ByteTokenizer | SubwordTokenizer:
    """The tokenizer that ``to_json()`` described (as saved in a checkpoint's metadata);
    ``source`` names where the data came from in errors."""
    path = source
    kind = data.get("type") if isinstance(data, dict) else None
    try:
        if kind == "char":
            return CharTokenizer(field(data, "chars", str(path), str))
        if kind == "byte":
            return ByteTokenizer()
        if kind == "subword":
            return SubwordTokenizer.from_json(data)
    except Exception as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: not a valid {kind} tokenizer ({err})") from None
    raise DataError(
        f"{path}: unknown tokenizer type {kind!r} (expected 'char', 'byte' or 'subword')"
    )
