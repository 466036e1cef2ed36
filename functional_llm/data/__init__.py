"""Data: tokenizers, token files, and batches drawn as pure functions of a key."""

from functional_llm.data.lm import (
    TokenWindows,
    eval_windows,
    read_tokens,
    sample_windows,
    write_tokens,
)
from functional_llm.data.tokenizers import ByteTokenizer, CharTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "CharTokenizer",
    "TokenWindows",
    "eval_windows",
    "load_tokenizer",
    "read_tokens",
    "sample_windows",
    "write_tokens",
]
