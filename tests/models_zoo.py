"""Tiny configurations of every model family, shared by the model tests."""

import torch

from functional_llm import models

VOCAB = 23


def gpt2(**kw):
    base = dict(vocab_size=VOCAB, max_seq_len=16, d_model=16, n_layers=2, n_heads=2)
    return models.GPT(models.GPTConfig(**{**base, **kw}))


def llama(**kw):
    base = dict(
        vocab_size=VOCAB, max_seq_len=16, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24
    )
    return models.GPT(models.GPTConfig.llama(**{**base, **kw}))


def bert(**kw):
    base = dict(
        vocab_size=VOCAB, max_seq_len=16, d_model=16, n_layers=2, n_heads=2, d_ff=24, dropout=0.0
    )
    return models.BERT(models.BERTConfig(**{**base, **kw}))


def transformer(**kw):
    base = dict(
        src_vocab_size=VOCAB, tgt_vocab_size=VOCAB + 2, d_model=16, nhead=2, num_encoder_layers=2,
        num_decoder_layers=2, dim_feedforward=24, dropout=0.0, max_seq_len=16,
    )  # fmt: skip
    return models.Transformer(models.TransformerConfig(**{**base, **kw}))


DECODERS = {
    "gpt2": gpt2,
    "llama": llama,
    "gpt_sinusoidal": lambda **kw: gpt2(positions="sinusoidal", **kw),
}


def tokens(key_seed: int, shape, vocab: int = VOCAB) -> torch.Tensor:
    from functional_llm import random

    return random.randint(random.key(key_seed), shape, 0, vocab)
