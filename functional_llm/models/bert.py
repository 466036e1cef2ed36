"""Encoder-only BERT (Devlin et al. 2019) with its two pretraining heads.

h_0 = LayerNorm(E[tokens] + P[positions] + T[token_types])     embeddings
h_l = block_l(h_{l-1})                                        post-LN, bidirectional
pooled = tanh(W_p h_L[..., 0, :] + b_p)                        the [CLS] summary
mlm_logits = LayerNorm(act(W_t h_L + b_t)) E^T + b_mlm          tied masked-LM head
nsp_logits = W_nsp pooled + b_nsp                              is-next-sentence head
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from functional_llm import random
from functional_llm.init import Normal
from functional_llm.models.config import check_choice, check_divides, check_positive, check_rate
from functional_llm.models.inputs import check_ids, check_like, check_range
from functional_llm.models.stages import Stage, cut
from functional_llm.nn import (
    ACTIVATIONS,
    Block,
    Embedding,
    LayerNorm,
    Linear,
    Stack,
    dropout,
    key_padding_mask,
)
from functional_llm.nn.module import Layer, Params, axes_of, init_all, maybe_split
from functional_llm.nn.positions import positions_like
from functional_llm.types import Activation

__all__ = ["BERT", "BERTConfig", "BERTOutput"]


@dataclass(frozen=True, kw_only=True)
class BERTConfig:
    """Static settings of BERT; the defaults are BERT-base (110M parameters)."""

    vocab_size: int = 30522
    max_seq_len: int = 512
    type_vocab_size: int = 2
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int = 3072
    activation: Activation = "gelu"
    dropout: float = 0.1
    norm_eps: float = 1e-12
    init_std: float = 0.02
    dtype: torch.dtype = torch.float32
    remat: bool = False

    def __post_init__(self) -> None:
        check_positive(
            self,
            "vocab_size",
            "max_seq_len",
            "type_vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "d_ff",
        )
        check_divides(self, "n_heads", "d_model")
        check_rate(self, "dropout")
        check_choice(self, "activation", ("relu", "gelu", "gelu_tanh"))
        if self.init_std <= 0 or self.norm_eps <= 0:
            raise ValueError("BERTConfig.init_std and norm_eps must be positive")

    @classmethod
    def base(cls, **overrides: Any) -> BERTConfig:
        return cls(**overrides)

    @classmethod
    def large(cls, **overrides: Any) -> BERTConfig:
        return cls(**{"d_model": 1024, "n_layers": 24, "n_heads": 16, "d_ff": 4096, **overrides})


class BERTOutput(NamedTuple):
    hidden: torch.Tensor  # (..., T, d_model), the last layer's states
    pooled: torch.Tensor  # (..., d_model), tanh(W_p h[CLS] + b_p)


@dataclass(frozen=True)
class BERT(Layer):
    """BERT encoder with pooler, tied MLM head and NSP head. Params::

    embed.table  pos.table  types.table  embed_norm    embeddings
    blocks.{i}.{attn, attn_norm, mlp, mlp_norm}        post-LN encoder blocks
    pooler  mlm.{transform, norm, bias}  nsp           heads
    """

    config: BERTConfig

    @property
    def stack(self) -> Stack:
        c = self.config
        block = Block(
            d_model=c.d_model,
            n_heads=c.n_heads,
            d_ff=c.d_ff,
            activation=c.activation,
            dropout=c.dropout,
            norm_eps=c.norm_eps,
            w_init=Normal(c.init_std),
            dtype=c.dtype,
        )
        return Stack(block=block, n_layers=c.n_layers, final_norm=False, remat=c.remat)

    def _parts(self) -> dict[str, Layer]:
        c, init = self.config, Normal(self.config.init_std)
        dense = Linear(
            in_dims=c.d_model,
            out_dims=c.d_model,
            bias=True,
            in_axes=("embed",),
            out_axes=(None,),
            w_init=init,
            dtype=c.dtype,
        )
        return {
            "embed": Embedding(num=c.vocab_size, dim=c.d_model, init_fn=init, dtype=c.dtype),
            "pos": Embedding(
                num=c.max_seq_len,
                dim=c.d_model,
                axes_names=(None, "embed"),
                init_fn=init,
                dtype=c.dtype,
            ),
            "types": Embedding(
                num=c.type_vocab_size,
                dim=c.d_model,
                axes_names=(None, "embed"),
                init_fn=init,
                dtype=c.dtype,
            ),
            "embed_norm": LayerNorm(dim=c.d_model, eps=c.norm_eps, dtype=c.dtype),
            "pooler": dense,
            "mlm_transform": dense,
            "mlm_norm": LayerNorm(dim=c.d_model, eps=c.norm_eps, dtype=c.dtype),
            "nsp": Linear(
                in_dims=c.d_model,
                out_dims=2,
                bias=True,
                in_axes=("embed",),
                out_axes=(None,),
                w_init=init,
                dtype=c.dtype,
            ),
        }

    def init(self, key: torch.Tensor) -> Params:
        k_parts, k_stack = random.split(key)
        p = init_all(self._parts(), k_parts)
        mlm_bias = torch.zeros(self.config.vocab_size, dtype=self.config.dtype, device=key.device)
        mlm = {"transform": p.pop("mlm_transform"), "norm": p.pop("mlm_norm"), "bias": mlm_bias}
        return {**p, **self.stack.init(k_stack), "mlm": mlm}

    def axes(self) -> Params:
        a = axes_of(self._parts())
        mlm = {"transform": a.pop("mlm_transform"), "norm": a.pop("mlm_norm"), "bias": ("vocab",)}
        return {**a, **self.stack.axes(), "mlm": mlm}

    def apply(
        self,
        params: Params,
        tokens: torch.Tensor,
        token_types: torch.Tensor | None = None,
        *,
        valid: torch.Tensor | None = None,
        key: torch.Tensor | None = None,
    ) -> BERTOutput:
        """Encode ``tokens: (..., T)``; ``token_types`` (segment ids) default to 0, ``valid``
        (True for real tokens) hides padding, ``key`` turns dropout on."""
        c = self.config
        check_ids("tokens", tokens, c.max_seq_len, c.vocab_size)
        check_like("token_types", token_types, "tokens", tokens)
        if token_types is not None:
            check_range("token_types", token_types, c.type_vocab_size)
        check_like("valid", valid, "tokens", tokens)
        self.check(params)
        k_embed, k_stack = maybe_split(key)
        h = self.embed(params, tokens, token_types, key=k_embed)
        mask = None if valid is None else key_padding_mask(valid)
        h = self.stack.apply(params, h, mask=mask, key=k_stack)
        return BERTOutput(h, self.pool(params, h))

    def embed(
        self,
        params: Params,
        tokens: torch.Tensor,
        token_types: torch.Tensor | None = None,
        *,
        key: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The blocks' input: ``norm(E[tokens] + P[positions] + S[token_types])``, with dropout
        under ``key``."""
        parts = self._parts()
        types = torch.zeros_like(tokens) if token_types is None else token_types
        h = (
            parts["embed"].apply(params["embed"], tokens)
            + parts["pos"].apply(params["pos"], positions_like(tokens))
            + parts["types"].apply(params["types"], types)
        )
        h = parts["embed_norm"].apply(params["embed_norm"], h)
        return dropout(h, self.config.dropout, key=key)

    def stages(self, n_stages: int) -> list[Stage]:
        """BERT cut into ``n_stages`` pipeline stages by blocks for masked-LM pretraining
        (:mod:`functional_llm.models.stages`): the first embeds ``tokens`` (segment 0, no
        padding), the last returns :meth:`mlm_logits`; the embedding is tied across them. The
        pooler and the NSP head are in no stage: pipelined pretraining is masked-LM only."""
        if self.config.dropout:
            raise ValueError("BERT.stages: pipeline stages run without keys; use inference(model)")
        return cut(
            self.config.n_layers,
            n_stages,
            embed=lambda p, tokens: self.embed(p, tokens),
            block=lambda p, h: self.stack.block.apply(p, h),
            head=self.mlm_logits,
            embed_params=("embed", "pos", "types", "embed_norm"),
            head_params=("mlm", "embed"),
            tied=("embed",),
        )

    def pool(
        self, params: Params, h: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """BERT's pooler: ``tanh(W_p h[..., 0, :] + b_p)`` on the first ([CLS]) token."""
        return torch.tanh(self._parts()["pooler"].apply(params["pooler"], h[..., 0, :]))

    def hidden_states(self, params: Params, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The last layer's states ``(..., T, d_model)`` (the task heads' common interface)."""
        return self.apply(params, tokens, **kwargs).hidden

    def mlm_logits(self, params: Params, h: torch.Tensor) -> torch.Tensor:
        """Masked-LM scores ``(..., vocab)`` from hidden states, tied to the token embeddings; the
        transform uses the model's activation, as BERT's ``BertPredictionHeadTransform`` does."""
        parts, mlm = self._parts(), params["mlm"]
        t = ACTIVATIONS[self.config.activation](parts["mlm_transform"].apply(mlm["transform"], h))
        t = parts["mlm_norm"].apply(mlm["norm"], t)
        return Embedding.attend(params["embed"], t) + mlm["bias"]

    def nsp_logits(self, params: Params, pooled: torch.Tensor) -> torch.Tensor:
        """Next-sentence scores ``(..., 2)``: index 0 "is next", 1 "is random" (BERT's order)."""
        return self._parts()["nsp"].apply(params["nsp"], pooled)
