"""Model families: encoder-decoder Transformer, decoder-only GPT/Llama, encoder-only BERT,
and fine-tuning heads."""

from functional_llm.models.bert import BERT, BERTConfig, BERTOutput
from functional_llm.models.gpt import GPT, GPTConfig
from functional_llm.models.heads import (
    ExtractiveQA,
    SequenceClassifier,
    SpanLogits,
    TokenClassifier,
)
from functional_llm.models.transformer import Transformer, TransformerConfig

__all__ = [
    "BERT",
    "GPT",
    "BERTConfig",
    "BERTOutput",
    "ExtractiveQA",
    "GPTConfig",
    "SequenceClassifier",
    "SpanLogits",
    "TokenClassifier",
    "Transformer",
    "TransformerConfig",
]
