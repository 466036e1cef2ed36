"""Decoder-only language models: GPT-2 and Llama from one config.

    h_0 = E[tokens] (+ P[positions])          token (and learned or sinusoidal) embeddings
    h_l = block_l(h_{l-1}), causal            pre-norm self-attention + MLP, L times
    logits = norm(h_L) E^T  (or  W_out)       tied (or separate) unembedding

GPT-2 flavour (the defaults): learned positions, LayerNorm, GELU, biases, tied embeddings.
Llama flavour (:meth:`GPTConfig.llama`): rotary positions, RMSNorm, SwiGLU, no biases,
grouped-query attention, untied output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_args

import torch

from functional_llm import random
from functional_llm.init import Normal
from functional_llm.models.config import check_choice, check_divides, check_positive, check_rate
from functional_llm.models.inputs import check_ids, check_like
from functional_llm.models.stages import Stage, cut
from functional_llm.nn import Block, Embedding, Linear, Stack, dropout, key_padding_mask
from functional_llm.nn.module import Layer, Params, axes_of, init_all, maybe_split
from functional_llm.nn.positions import RopeScaling, positions_like, sinusoidal
from functional_llm.types import ACTIVATION_NAMES, Activation, NormKind

__all__ = ["GPT", "GPTConfig"]

_GATED = ("swiglu", "geglu")


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Static settings of a decoder-only model; validated on construction."""

    vocab_size: int = 50257
    max_seq_len: int = 1024
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int | None = None
    positions: str = "learned"
    norm: NormKind = "layernorm"
    activation: Activation = "gelu"
    bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    init_std: float = 0.02
    dtype: torch.dtype = torch.float32
    remat: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, Mapping):  # as config_to_dict wrote it
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        check_positive(self, "vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads")
        if self.head_dim is None:
            check_divides(self, "n_heads", "d_model")
        else:
            check_positive(self, "head_dim")
        if self.n_kv_heads is not None:
            check_positive(self, "n_kv_heads")
            check_divides(self, "n_kv_heads", "n_heads")
        if self.d_ff is not None:
            check_positive(self, "d_ff")
        check_choice(self, "positions", ("learned", "rope", "sinusoidal", "none"))
        check_choice(self, "norm", get_args(NormKind))
        check_choice(self, "activation", ACTIVATION_NAMES)
        check_rate(self, "dropout")
        if self.positions == "rope" and self.dim_per_head % 2:
            raise ValueError(f"GPTConfig.positions={self.positions!r} needs an even head dim")
        if self.positions == "sinusoidal" and self.d_model % 2:
            raise ValueError("GPTConfig.positions='sinusoidal' needs an even d_model")
        if self.init_std <= 0 or self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("GPTConfig.init_std, norm_eps and rope_theta must be positive")

    @property
    def dim_per_head(self) -> int:
        """``head_dim``, else ``d_model / n_heads`` (a pruned model keeps its heads' width)."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """``d_ff``, else ``4 d_model``; gated MLPs keep the parameter count with ``8/3 d_model``
        rounded up to a multiple of 64, as Llama does."""
        if self.d_ff is not None:
            return self.d_ff
        if self.activation in _GATED:
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model

    @classmethod
    def gpt2(cls, size: str = "small", **overrides: Any) -> GPTConfig:
        """GPT-2 ``small`` (124M), ``medium``, ``large`` or ``xl``, with any field overridden.
        GPT-2's MLP uses the tanh approximation of GELU (``gelu_new`` in Hugging Face)."""
        sizes = {
            "small": (12, 12, 768),
            "medium": (24, 16, 1024),
            "large": (36, 20, 1280),
            "xl": (48, 25, 1600),
        }
        if size not in sizes:
            raise ValueError(f"GPT-2 size must be one of {', '.join(sizes)}; got {size!r}")
        n_layers, n_heads, d_model = sizes[size]
        gpt2 = {"n_layers": n_layers, "n_heads": n_heads, "d_model": d_model}
        return cls(**{**gpt2, "activation": "gelu_tanh", **overrides})

    @classmethod
    def llama(cls, **overrides: Any) -> GPTConfig:
        """Llama's architecture (RoPE, RMSNorm, SwiGLU, no biases, untied); sizes as overrides."""
        llama = {
            "positions": "rope",
            "norm": "rmsnorm",
            "activation": "swiglu",
            "bias": False,
            "tie_embeddings": False,
            "norm_eps": 1e-5,
            "vocab_size": 32000,
            "max_seq_len": 2048,
        }
        return cls(**{**llama, **overrides})


@dataclass(frozen=True)
class GPT(Layer):
    """A decoder-only Transformer. Params::

    embed.table (vocab, d)   pos.table (max_seq_len, d)   [learned positions only]
    blocks.{i}.{attn_norm, attn.{q,k,v,o}, mlp_norm, mlp.{up,gate,down}}
    norm                     unembed.w (d, vocab)          [untied only]
    """

    config: GPTConfig

    @property
    def block(self) -> Block:
        c = self.config
        std = c.init_std
        return Block(
            d_model=c.d_model,
            n_heads=c.n_heads,
            d_ff=c.ffn_dim,
            n_kv_heads=c.n_kv_heads,
            head_dim=c.head_dim,
            activation=c.activation,
            dropout=c.dropout,
            norm_first=True,
            norm=c.norm,
            norm_eps=c.norm_eps,
            bias=c.bias,
            rope_theta=c.rope_theta if c.positions == "rope" else None,
            rope_scaling=c.rope_scaling if c.positions == "rope" else None,
            w_init=Normal(std),
            out_init=Normal(std / math.sqrt(2 * c.n_layers)),
            dtype=c.dtype,
        )

    @property
    def stack(self) -> Stack:
        return Stack(
            block=self.block,
            n_layers=self.config.n_layers,
            final_norm=True,
            remat=self.config.remat,
        )

    def _parts(self) -> dict[str, Layer]:
        c = self.config
        parts: dict[str, Layer] = {
            "embed": Embedding(
                num=c.vocab_size, dim=c.d_model, init_fn=Normal(c.init_std), dtype=c.dtype
            )
        }
        if c.positions == "learned":
            parts["pos"] = Embedding(
                num=c.max_seq_len,
                dim=c.d_model,
                axes_names=(None, "embed"),
                init_fn=Normal(c.init_std),
                dtype=c.dtype,
            )
        if not c.tie_embeddings:
            parts["unembed"] = Linear(
                in_dims=c.d_model,
                out_dims=c.vocab_size,
                bias=False,
                in_axes=("embed",),
                out_axes=("vocab",),
                w_init=Normal(c.init_std),
                dtype=c.dtype,
            )
        return parts

    def init(self, key: torch.Tensor) -> Params:
        k_parts, k_stack = random.split(key)
        return {**init_all(self._parts(), k_parts), **self.stack.init(k_stack)}

    def axes(self) -> Params:
        return {**axes_of(self._parts()), **self.stack.axes()}

    def hidden_states(
        self,
        params: Params,
        tokens: torch.Tensor,
        *,
        valid: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        key: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states ``(..., T, d_model)`` for ``tokens: (..., T)``.

        ``valid`` (``(..., T)`` bool, True for real tokens) hides padding from attention;
        ``positions`` default to ``0..T-1``; ``segments`` (``(..., T)`` ids) keeps attention
        inside each run of equal ids (sequences packed into one row); ``key`` turns dropout on.
        """
        c = self.config
        check_ids("tokens", tokens, c.max_seq_len, c.vocab_size)
        check_like("valid", valid, "tokens", tokens)
        check_like("segments", segments, "tokens", tokens)
        self.check(params)
        k_embed, k_stack = maybe_split(key)
        pos = positions_like(tokens) if positions is None else positions
        h = self.embed(params, tokens, pos, key=k_embed)
        mask = None if valid is None else key_padding_mask(valid)
        if segments is not None:  # (..., 1, T, T): the same segment only
            same = (segments[..., :, None] == segments[..., None, :])[..., None, :, :]
            mask = same if mask is None else mask & same
        return self.stack.apply(params, h, mask=mask, causal=True, positions=pos, key=k_stack)

    def embed(
        self,
        params: Params,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        *,
        key: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The blocks' input ``h_0 = E[tokens] (+ P[positions])``, with dropout under ``key``."""
        c = self.config
        parts = self._parts()
        h = parts["embed"].apply(params["embed"], tokens)
        if c.positions == "learned":
            h = h + parts["pos"].apply(params["pos"], positions)
        elif c.positions == "sinusoidal":
            h = h + sinusoidal(positions, c.d_model).to(h.dtype)
        return dropout(h, c.dropout, key=key)

    def logits(self, params: Params, h: torch.Tensor) -> torch.Tensor:
        """Unembed hidden states: ``(..., d_model) -> (..., vocab)``."""
        if self.config.tie_embeddings:
            return Embedding.attend(params["embed"], h)
        return self._parts()["unembed"].apply(params["unembed"], h)

    def apply(
        self,
        params: Params,
        tokens: torch.Tensor,
        *,
        valid: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        key: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits ``(..., T, vocab)``: position ``t`` sees ``tokens[..., :t+1]`` only
        (and, with ``segments``, only those of its own segment)."""
        h = self.hidden_states(
            params, tokens, valid=valid, positions=positions, segments=segments, key=key
        )
        return self.logits(params, h)

    def stages(self, n_stages: int) -> list[Stage]:
        """The model cut into ``n_stages`` pipeline stages by blocks
        (:mod:`functional_llm.models.stages`): the first embeds, the last norms and unembeds; a
        tied embedding is held by both. Stages run without dropout keys."""
        c = self.config
        if c.dropout:
            raise ValueError("GPT.stages: pipeline stages run without keys; use inference(model)")
        return cut(
            c.n_layers,
            n_stages,
            embed=lambda p, tokens: self.embed(p, tokens, positions_like(tokens)),
            block=lambda p, h: self.block.apply(p, h, causal=True),
            head=lambda p, h: self.logits(p, self.stack.finish(p, h)),
            embed_params=("embed", "pos"),
            head_params=("norm", "embed" if c.tie_embeddings else "unembed"),
            tied=("embed",) if c.tie_embeddings else (),
        )

    def pool(
        self, params: Params, h: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One vector per sequence: the hidden state of the last real token."""
        if valid is None:
            return h[..., -1, :]
        # gather, not take_along_dim: it keeps batch and length dynamic under torch.export
        last = valid.long().cumsum(-1).argmax(-1, keepdim=True)  # (..., 1): the last True
        index = last[..., None].expand(*last.shape, h.shape[-1])
        return h.gather(-2, index).squeeze(-2)
