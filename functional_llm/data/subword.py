"""Trainable subword tokenizers: WordPiece (BERT) and byte-level BPE (GPT-2), with special
tokens, offsets back to the text, word ids, pairs with segment ids, and save / load.

The algorithms run in Hugging Face's ``tokenizers`` (Rust): training on a corpus of tens of MB
takes seconds instead of minutes, its normalisation and pre-tokenisation are exactly BERT's
and GPT-2's, and its tokenizer files are plain JSON (loading one runs no code). This module
keeps it behind a small frozen interface and adds what the tasks need on top, as pure
functions of their inputs:

``[CLS] a_1 ... a_n [SEP] b_1 ... b_m [SEP]``      :meth:`SubwordTokenizer.encode_example`

with ``token_types`` 0 up to and including the first ``[SEP]``, 1 after it; pairs longer than
``max_length`` lose tokens from the end of the longer part first (BERT's ``longest_first``).
``offsets[i] = (start, end)`` is the character span of token ``i`` in its source text, so
``text[start:end]`` recovers it; special tokens have ``(0, 0)``, ``word_ids`` ``-1`` and
``segments`` ``-1``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from functional_llm.files import write_atomic

__all__ = ["SPECIALS", "Encoded", "SubwordTokenizer"]

#: Special-token roles and their strings. BERT's inputs use cls/sep/mask/pad; a GPT stream is
#: separated by eos (bos is the same token, as in GPT-2's ``<|endoftext|>``).
SPECIALS: dict[str, str] = {
    "pad": "[PAD]",
    "unk": "[UNK]",
    "cls": "[CLS]",
    "sep": "[SEP]",
    "mask": "[MASK]",
    "bos": "[EOS]",
    "eos": "[EOS]",
}


# The usual special tokens of Hugging Face tokenizers and the roles they play.
_ROLES_BY_NAME: dict[str, tuple[str, ...]] = {
    "[PAD]": ("pad",),
    "[UNK]": ("unk",),
    "[CLS]": ("cls",),
    "[SEP]": ("sep",),
    "[MASK]": ("mask",),
    "<|endoftext|>": ("bos", "eos", "unk"),
    "<s>": ("bos", "cls"),
    "</s>": ("eos", "sep"),
    "<unk>": ("unk",),
    "<pad>": ("pad",),
    "<mask>": ("mask",),
}


@dataclass(frozen=True)
class Encoded:
    """One tokenised example; all arrays have one row per token."""

    ids: np.ndarray  # (N,) int64 token ids
    token_types: np.ndarray  # (N,) int64 segment ids for the model: 0 for a, 1 for b
    offsets: np.ndarray  # (N, 2) int64 character span of each token in its source text
    word_ids: np.ndarray  # (N,) int64 index of the word within its segment; -1 for specials
    segments: np.ndarray  # (N,) int64 0 (text), 1 (pair) or -1 (special token)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def special(self) -> np.ndarray:
        """True at special tokens ([CLS], [SEP], ...): never masked, never labelled."""
        return self.segments < 0

    @property
    def word_starts(self) -> np.ndarray:
        """True at the first sub-word of each word (where a word's label goes)."""
        w, s = self.word_ids, self.segments
        prev_same = np.r_[False, (w[1:] == w[:-1]) & (s[1:] == s[:-1])]
        return (w >= 0) & ~prev_same

    def take(self, index: slice | np.ndarray) -> Encoded:
        return Encoded(*(getattr(self, f)[index] for f in self.__dataclass_fields__))

    @staticmethod
    def join(parts: Sequence[Encoded]) -> Encoded:
        """The pieces one after another (e.g. sentences packed into one segment)."""
        fields = Encoded.__dataclass_fields__
        return Encoded(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))


def _from_hf(enc: tokenizers.Encoding, segment: int) -> Encoded:
    n = len(enc.ids)
    words = np.array([-1 if w is None else w for w in enc.word_ids], dtype=np.int64)
    return Encoded(
        ids=np.array(enc.ids, dtype=np.int64),
        token_types=np.full(n, max(segment, 0), dtype=np.int64),
        offsets=np.array(enc.offsets, dtype=np.int64).reshape(n, 2),
        word_ids=words,
        segments=np.full(n, segment, dtype=np.int64),
    )


def _truncate_longest_first(a: int, b: int, budget: int) -> tuple[int, int]:
    """Lengths of a and b after removing tokens one at a time from the longer (a on ties)."""
    while a + b > budget:
        if a >= b:
            a -= 1
        else:
            b -= 1
    return a, b


@dataclass(frozen=True)
class SubwordTokenizer:
    """A trained WordPiece or byte-level BPE vocabulary with special tokens (:data:`SPECIALS`).

    Build one with :meth:`train`, or :func:`~functional_llm.data.load_tokenizer` a saved one.
    """

    backend: tokenizers.Tokenizer
    kind: Literal["wordpiece", "bpe"]
    specials: Mapping[str, str] = field(default_factory=lambda: dict(SPECIALS), hash=False)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 8000,
        kind: Literal["wordpiece", "bpe"] = "wordpiece",
        *,
        lowercase: bool = True,
        min_frequency: int = 2,
    ) -> SubwordTokenizer:
        """Learn a vocabulary of ``vocab_size`` entries (specials included) from ``texts``.
        WordPiece uses BERT's normaliser (``lowercase``, accents stripped when lowercasing) and
        splits on whitespace and punctuation; BPE works on UTF-8 bytes and is lossless.

        WordPiece training is not reproducible between processes: ``tokenizers`` breaks ties in
        hash-map order (huggingface/tokenizers#1794), so two trainings on the same text can
        differ in a few pieces. Save the tokenizer with a run (the experiments do) and load it
        to reproduce or resume; byte-level BPE training is deterministic."""
        specials = list(dict.fromkeys(SPECIALS.values()))
        if vocab_size <= len(specials):
            raise ValueError(f"vocab_size must exceed the {len(specials)} special tokens")
        if kind == "wordpiece":
            backend = tokenizers.Tokenizer(models.WordPiece(unk_token=SPECIALS["unk"]))
            backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
            backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            backend.decoder = decoders.WordPiece()
            trainer = trainers.WordPieceTrainer(
                vocab_size=vocab_size,
                min_frequency=min_frequency,
                special_tokens=specials,
                show_progress=False,
            )
        elif kind == "bpe":
            backend = tokenizers.Tokenizer(models.BPE())
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.decoder = decoders.ByteLevel()
            backend.post_processor = processors.ByteLevel(trim_offsets=True)
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size,
                min_frequency=min_frequency,
                special_tokens=specials,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                show_progress=False,
            )
        else:
            raise ValueError(f"SubwordTokenizer kind must be 'wordpiece' or 'bpe', got {kind!r}")
        backend.train_from_iterator(texts, trainer)
        return cls(backend, kind)

    # -- vocabulary ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def id_of(self, role: str) -> int:
        """The id of a special token by role: ``pad unk cls sep mask bos eos``."""
        if role not in SPECIALS:
            raise KeyError(f"unknown special-token role {role!r}; roles: {sorted(SPECIALS)}")
        if role not in self.specials:
            have = ", ".join(f"{r}={t!r}" for r, t in self.specials.items()) or "none"
            raise KeyError(f"the tokenizer has no special token for role {role!r} (it has {have})")
        i = self.backend.token_to_id(self.specials[role])
        if i is None:
            raise KeyError(f"the tokenizer has no {self.specials[role]!r} token (role {role!r})")
        return i

    @property
    def special_ids(self) -> list[int]:
        return sorted({self.id_of(role) for role in self.specials})

    def token(self, i: int) -> str:
        token = self.backend.id_to_token(i)
        if token is None:
            raise IndexError(f"token id {i} is outside the vocabulary of {self.vocab_size}")
        return token

    # -- encoding -----------------------------------------------------------------------------

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` without special tokens (the LM tokenizers' interface)."""
        return np.array(self.backend.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def tokenize(self, text: str | Sequence[str], segment: int = 0) -> Encoded:
        """``text`` without special tokens, with offsets and word ids. A list of words (CoNLL)
        is taken as pre-split: ``word_ids`` index the list and offsets are within each word."""
        words = not isinstance(text, str)
        return _from_hf(
            self.backend.encode(
                list(text) if words else text, is_pretokenized=words, add_special_tokens=False
            ),
            segment,
        )

    def encode_example(
        self,
        text: str | Sequence[str],
        pair: str | Sequence[str] | None = None,
        *,
        max_length: int | None = None,
    ) -> Encoded:
        """``[CLS] text [SEP] (pair [SEP])``, truncated longest-first to ``max_length``."""
        a = self.tokenize(text, 0)
        b = None if pair is None else self.tokenize(pair, 1)
        n_special = 2 if b is None else 3
        if max_length is not None:
            if max_length <= n_special:
                raise ValueError(f"max_length {max_length} leaves no room beside the specials")
            keep_a, keep_b = _truncate_longest_first(len(a), len(b or ()), max_length - n_special)
            a = a.take(slice(0, keep_a))
            b = None if b is None else b.take(slice(0, keep_b))
        parts = [self.special_tokens("cls", 0), a, self.special_tokens("sep", 0)]
        if b is not None:
            parts += [b, self.special_tokens("sep", 1)]
        return Encoded.join(parts)

    def special_tokens(self, role: str, token_type: int = 0, count: int = 1) -> Encoded:
        """``count`` copies of one special token as an :class:`Encoded` piece."""
        z = np.zeros(count, dtype=np.int64)
        return Encoded(
            z + self.id_of(role), z + token_type, np.zeros((count, 2), np.int64), z - 1, z - 1
        )

    def decode(self, ids: Any, skip_special: bool = True) -> str:
        ids = np.asarray(ids.tolist() if hasattr(ids, "tolist") else ids).tolist()
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    # -- files --------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        backend = json.loads(self.backend.to_str())
        return {
            "type": "subword",
            "kind": self.kind,
            "specials": dict(self.specials),
            "backend": backend,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SubwordTokenizer:
        backend = tokenizers.Tokenizer.from_str(json.dumps(data["backend"]))
        specials = data.get("specials", SPECIALS)
        tok = cls(backend, data["kind"], dict(specials))
        missing = [s for s in specials.values() if backend.token_to_id(s) is None]
        if missing:
            raise ValueError(f"subword tokenizer file lacks special tokens {missing}")
        return tok

    @classmethod
    def from_hf(
        cls, data: dict[str, Any], roles: Mapping[str, str] | None = None
    ) -> SubwordTokenizer:
        """A Hugging Face ``tokenizer.json`` (its parsed JSON): WordPiece (BERT), byte-level
        BPE (GPT-2) or SentencePiece-style BPE (Llama). ``roles`` maps our roles to its special
        tokens (from ``special_tokens_map.json``); without it, the usual names are recognised
        (``[CLS]``, ``<s>``, ``<|endoftext|>``, ...). Its encode and decode are the file's own."""
        model = data.get("model")
        model_type = model.get("type") if isinstance(model, dict) else model
        if model_type == "WordPiece":
            kind: Literal["wordpiece", "bpe"] = "wordpiece"
        elif model_type == "BPE":
            kind = "bpe"
        else:
            raise ValueError(f"tokenizer model {model_type!r} is not supported (WordPiece or BPE)")
        backend = tokenizers.Tokenizer.from_str(json.dumps(data))
        if roles is None:
            specials = [t["content"] for t in data.get("added_tokens", []) if t.get("special")]
            roles = {role: t for t in specials for role in _ROLES_BY_NAME.get(t, ())}
        absent = {r: t for r, t in roles.items() if backend.token_to_id(t) is None}
        if absent:
            raise ValueError(f"special tokens {absent} are not in the tokenizer's vocabulary")
        return cls(backend, kind, {r: t for r, t in roles.items() if r in SPECIALS})

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON, atomically; :func:`load_tokenizer` reads it back."""
        write_atomic(path, json.dumps(self.to_json(), ensure_ascii=False).encode("utf-8"))
