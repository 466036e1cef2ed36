"""Data: tokenizers, token files, task formats, and transforms as pure functions of a key."""

from functional_llm.data import augment, chat, fim
from functional_llm.data.classification import (
    encode_classification,
    label_vocab,
    read_classification,
)
from functional_llm.data.conll import (
    align_labels,
    bio_to_bioes,
    bioes_to_bio,
    encode_tagging,
    read_conll,
    word_predictions,
)
from functional_llm.data.lm import (
    TokenWindows,
    eval_windows,
    read_tokens,
    sample_windows,
    write_tokens,
)
from functional_llm.data.parallel import read_catalog, read_parallel, seq2seq_batch
from functional_llm.data.reading import DataError, read_json, read_jsonl, read_text
from functional_llm.data.squad import (
    QAExample,
    predict_answers,
    qa_features,
    read_squad,
    token_span,
)
from functional_llm.data.subword import SPECIALS, Encoded, SubwordTokenizer
from functional_llm.data.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    load_tokenizer,
    tokenizer_from_json,
)
from functional_llm.data.transforms import BatchOrder, mask_tokens, nsp_pairs, pad_batch

__all__ = [
    "SPECIALS",
    "BatchOrder",
    "ByteTokenizer",
    "CharTokenizer",
    "DataError",
    "Encoded",
    "QAExample",
    "SubwordTokenizer",
    "TokenWindows",
    "align_labels",
    "augment",
    "bio_to_bioes",
    "bioes_to_bio",
    "chat",
    "encode_classification",
    "encode_tagging",
    "eval_windows",
    "fim",
    "label_vocab",
    "load_tokenizer",
    "mask_tokens",
    "nsp_pairs",
    "pad_batch",
    "predict_answers",
    "qa_features",
    "read_catalog",
    "read_classification",
    "read_conll",
    "read_json",
    "read_jsonl",
    "read_parallel",
    "read_squad",
    "read_text",
    "read_tokens",
    "sample_windows",
    "seq2seq_batch",
    "token_span",
    "tokenizer_from_json",
    "word_predictions",
    "write_tokens",
]
