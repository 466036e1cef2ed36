"""Hypothesis strategies for property tests of your own models: keys, tiny configs of every
family, params, padded token batches and optimizer hyperparameters. hypothesis is imported when
a strategy is built, so the rest of :mod:`functional_llm.testing` works without it."""

from __future__ import annotations

from typing import Any

import torch

from functional_llm import random

__all__ = [
    "adamw_hyperparams",
    "bert_configs",
    "gpt_configs",
    "keys",
    "params_of",
    "token_batches",
    "transformer_configs",
]


def _st() -> Any:
    from hypothesis import strategies as st

    return st


def keys() -> Any:
    """Random keys (any 64-bit seed)."""
    return _st().integers(0, 2**64 - 1).map(lambda seed: random.key(seed - 2**63))


def _heads(draw: Any, max_heads: int) -> tuple[int, int]:
    st = _st()
    n_heads = draw(st.integers(1, max_heads))
    return n_heads, n_heads * draw(st.sampled_from([2, 4, 8]))


def _decoder_or_encoder(draw: Any, max_layers: int, max_heads: int) -> dict[str, int]:
    """The fields GPT and BERT configs share: vocabulary, length, width, depth, heads."""
    st = _st()
    n_heads, d_model = _heads(draw, max_heads)
    return {
        "vocab_size": draw(st.integers(2, 40)),
        "max_seq_len": draw(st.integers(4, 32)),
        "d_model": d_model,
        "n_layers": draw(st.integers(1, max_layers)),
        "n_heads": n_heads,
    }


def gpt_configs(
    max_layers: int = 2,
    max_heads: int = 4,
    flavours: tuple[str, ...] = ("gpt2", "llama"),
    **fixed: Any,
) -> Any:
    """Tiny :class:`~functional_llm.models.GPTConfig` s: GPT-2 or Llama flavour, 1 to
    ``max_layers`` layers, heads, grouped kv heads, even head dims; ``fixed`` fields are kept."""
    st = _st()
    from functional_llm.models import GPTConfig

    @st.composite
    def build(draw: Any) -> GPTConfig:
        fields: dict[str, Any] = {**_decoder_or_encoder(draw, max_layers, max_heads), **fixed}
        n_heads = fields["n_heads"]
        kv_divisors = [d for d in range(1, n_heads + 1) if n_heads % d == 0]
        if draw(st.sampled_from(flavours)) == "llama":
            fields.setdefault("n_kv_heads", draw(st.sampled_from(kv_divisors)))
            return GPTConfig.llama(**fields)
        return GPTConfig(**fields)

    return build()


def bert_configs(max_layers: int = 2, max_heads: int = 4, **fixed: Any) -> Any:
    """Tiny :class:`~functional_llm.models.BERTConfig` s (no dropout unless ``fixed``)."""
    st = _st()
    from functional_llm.models import BERTConfig

    @st.composite
    def build(draw: Any) -> BERTConfig:
        fields: dict[str, Any] = _decoder_or_encoder(draw, max_layers, max_heads)
        fields |= {
            "d_ff": 2 * fields["d_model"],
            "activation": draw(st.sampled_from(["gelu", "relu", "gelu_tanh"])),
            "dropout": 0.0,
            **fixed,
        }
        return BERTConfig(**fields)

    return build()


def transformer_configs(max_layers: int = 2, max_heads: int = 4, **fixed: Any) -> Any:
    """Tiny :class:`~functional_llm.models.TransformerConfig` s: pre- or post-LN, learned or
    sinusoidal positions, tied output or not, with a copy head or not where the two sides
    share a vocabulary (no dropout unless ``fixed``)."""
    st = _st()
    from functional_llm.models import TransformerConfig

    @st.composite
    def build(draw: Any) -> TransformerConfig:
        n_heads, d_model = _heads(draw, max_heads)
        vocab = draw(st.integers(2, 40))
        fields = {
            "src_vocab_size": vocab,
            "tgt_vocab_size": vocab if draw(st.booleans()) else draw(st.integers(2, 40)),
            "d_model": d_model,
            "nhead": n_heads,
            "num_encoder_layers": draw(st.integers(1, max_layers)),
            "num_decoder_layers": draw(st.integers(1, max_layers)),
            "dim_feedforward": 2 * d_model,
            "dropout": 0.0,
            "norm_first": draw(st.booleans()),
            "positions": draw(st.sampled_from(["sinusoidal", "learned"])),
            "tie_output": draw(st.booleans()),
            "max_seq_len": 32,
            **fixed,
        }
        joint = fields["src_vocab_size"] == fields["tgt_vocab_size"]
        if "copy_source" not in fixed:
            fields["copy_source"] = joint and draw(st.booleans())
        return TransformerConfig(**fields)

    return build()


def params_of(model: Any) -> Any:
    """Params of ``model`` from a drawn key."""
    return keys().map(model.init)


def token_batches(
    vocab_size: int, max_batch: int = 3, max_len: int = 8, padding: str | None = "right"
) -> Any:
    """``(tokens (B, T), valid (B, T))``: ids in ``[0, vocab_size)``, each row with at least one
    real token, padded on the ``right`` or ``left`` (or ``None``: all real)."""
    if padding not in ("right", "left", None):
        raise ValueError(f"token_batches: padding must be 'right', 'left' or None, got {padding!r}")
    st = _st()

    @st.composite
    def build(draw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = draw(st.integers(1, max_batch)), draw(st.integers(1, max_len))
        tokens = random.randint(draw(keys()), (b, t), 0, vocab_size)
        if padding is None:
            return tokens, torch.ones(b, t, dtype=torch.bool)
        lengths = torch.tensor(draw(st.lists(st.integers(1, t), min_size=b, max_size=b)))
        valid = torch.arange(t) < lengths[:, None]
        return tokens, valid if padding == "right" else valid.flip(-1)

    return build()


def adamw_hyperparams() -> Any:
    """Keyword arguments of :func:`~functional_llm.optim.adamw` in the ranges people use."""
    st = _st()
    return st.fixed_dictionaries({
        "learning_rate": st.floats(1e-5, 1e-1),
        "b1": st.floats(0.0, 0.99),
        "b2": st.floats(0.9, 0.9999),
        "eps": st.sampled_from([1e-8, 1e-6]),
        "weight_decay": st.floats(0.0, 0.3),
    })  # fmt: skip
