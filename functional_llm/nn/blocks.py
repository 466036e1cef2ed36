"""Transformer blocks: residual sub-layers around attention and the MLP.

Post-LN (Vaswani et al. 2017; BERT; ``torch.nn`` with ``norm_first=False``):
    ``x = norm(x + dropout(sublayer(x)))``
Pre-LN (GPT-2, Llama; ``norm_first=True``):
    ``x = x + dropout(sublayer(norm(x)))``

:class:`Block` is self-attention then MLP: ``torch.nn.TransformerEncoderLayer`` (BERT's layer),
and with ``causal=True`` the decoder-only block of GPT and Llama (nanoGPT's ``Block``);
:class:`DecoderBlock` adds cross-attention to an encoder's memory between the two, as
``torch.nn.TransformerDecoderLayer`` does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from functional_llm.init import Initializer
from functional_llm.nn.attention import MultiHeadAttention
from functional_llm.nn.dropout import dropout
from functional_llm.nn.mlp import MLP
from functional_llm.nn.module import Layer, Params, axes_of, init_all, maybe_split
from functional_llm.nn.norm import LayerNorm, RMSNorm, make_norm
from functional_llm.nn.positions import RopeScaling
from functional_llm.nn.taps import tap
from functional_llm.types import Activation, NormKind

__all__ = ["Block", "DecoderBlock"]

Key = torch.Tensor | None


@dataclass(frozen=True, kw_only=True)
class Block(Layer):
    """Self-attention and MLP sub-layers (causal or not, per call), with
    ``torch.nn.TransformerEncoderLayer``'s defaults."""

    d_model: int
    n_heads: int
    d_ff: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    activation: Activation = "relu"
    dropout: float = 0.0
    norm_first: bool = False
    norm: NormKind = "layernorm"
    norm_eps: float = 1e-5
    bias: bool = True
    rope_theta: float | None = None
    rope_scaling: RopeScaling | None = None
    w_init: Initializer | None = None
    out_init: Initializer | None = None
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{type(self).__name__}.dropout must be in [0, 1), got {self.dropout}")
        self._sublayers()  # validates the attention, MLP and norm settings

    def _attention(self, cross: bool = False) -> MultiHeadAttention:
        return MultiHeadAttention(
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            bias=self.bias,
            dropout=self.dropout,
            rope_theta=None if cross else self.rope_theta,
            rope_scaling=None if cross else self.rope_scaling,
            w_init=self.w_init,
            out_init=self.out_init,
            dtype=self.dtype,
        )

    def _norm(self) -> LayerNorm | RMSNorm:
        return make_norm(self.norm, self.d_model, self.norm_eps, self.bias, self.dtype)

    def _mlp(self) -> MLP:
        return MLP(
            d_model=self.d_model,
            d_ff=self.d_ff,
            activation=self.activation,
            bias=self.bias,
            dropout=self.dropout,
            w_init=self.w_init,
            out_init=self.out_init,
            dtype=self.dtype,
        )

    def _sublayers(self) -> dict[str, Layer]:
        return {
            "attn_norm": self._norm(),
            "attn": self._attention(),
            "mlp_norm": self._norm(),
            "mlp": self._mlp(),
        }

    def init(self, key: torch.Tensor) -> Params:
        return init_all(self._sublayers(), key)

    def axes(self) -> Params:
        return axes_of(self._sublayers())

    def _residual(
        self,
        params: Params,
        name: str,
        x: torch.Tensor,
        sublayer: Callable[[torch.Tensor], torch.Tensor],
        key: Key,
    ) -> torch.Tensor:
        """One residual sub-layer, pre- or post-norm, with dropout on its output."""
        norm = self._norm()
        if self.norm_first:
            return x + dropout(
                sublayer(norm.apply(params[f"{name}_norm"], x)), self.dropout, key=key
            )
        return norm.apply(params[f"{name}_norm"], x + dropout(sublayer(x), self.dropout, key=key))

    def apply(
        self,
        params: Params,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        positions: torch.Tensor | None = None,
        key: Key = None,
    ) -> torch.Tensor:
        """``(..., T, d_model) -> (..., T, d_model)``; ``mask`` is the self-attention mask.
        Taps: ``input`` and ``output`` (the residual stream around the block)."""
        return self._forward(
            params,
            x,
            None,
            mask=mask,
            causal=causal,
            memory_mask=None,
            positions=positions,
            key=key,
        )

    def apply_cached(
        self,
        params: Params,
        x: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        *,
        slots: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        donate: bool = False,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One decoding step of a causal block: self-attention writes ``x``'s keys and values
        into this layer's ``cache`` at ``slots`` and reads every slot under ``mask``
        (:meth:`MultiHeadAttention.apply_cached`); a decoder block then attends to the
        memory's precomputed ``memory_kv`` under ``memory_mask``
        (:meth:`MultiHeadAttention.apply_memory`); then the MLP. Without dropout (decode with
        ``fl.nn.inference(model)``). Returns the output and the layer's cache."""
        written: list[tuple[torch.Tensor, torch.Tensor]] = []

        def attend(h: torch.Tensor) -> torch.Tensor:
            y, kv = self._attention().apply_cached(
                params["attn"], h, cache, slots=slots, mask=mask, positions=positions,
                donate=donate,
            )  # fmt: skip
            written.append(kv)
            return y

        x = self._residual(params, "attn", x, attend, None)
        if memory_kv is not None:
            cross = self._attention(cross=True)
            attend_memory = lambda h: cross.apply_memory(  # noqa: E731
                params["cross"], h, memory_kv, mask=memory_mask
            )
            x = self._residual(params, "cross", x, attend_memory, None)
        x = self._residual(params, "mlp", x, lambda h: self._mlp().apply(params["mlp"], h), None)
        return x, written[0]

    def _forward(
        self,
        params: Params,
        x: torch.Tensor,
        memory: torch.Tensor | None,
        *,
        mask: torch.Tensor | None,
        causal: bool,
        memory_mask: torch.Tensor | None,
        positions: torch.Tensor | None,
        key: Key,
    ) -> torch.Tensor:
        """Self-attention, cross-attention to ``memory`` where there is one, then the MLP: each
        a residual sub-layer with its own keys (for the sub-layer and its output dropout)."""
        keys = iter(maybe_split(key, 4 if memory is None else 6))
        x = tap(params, "input", x)
        attentions: dict[str, dict[str, Any]] = {
            "attn": {"mask": mask, "causal": causal, "positions": positions}
        }
        if memory is not None:
            attentions["cross"] = {"context": memory, "mask": memory_mask}
        for name, kw in attentions.items():
            layer, k_attn = self._attention(cross=name == "cross"), next(keys)
            attend = functools.partial(layer.apply, params[name], key=k_attn, **kw)
            x = self._residual(params, name, x, attend, next(keys))
        k_mlp, k_out = next(keys), next(keys)
        mlp = lambda h: self._mlp().apply(params["mlp"], h, key=k_mlp)  # noqa: E731
        x = self._residual(params, "mlp", x, mlp, k_out)
        return tap(params, "output", x)


@dataclass(frozen=True, kw_only=True)
class DecoderBlock(Block):
    """Self-attention, cross-attention to ``memory``, then MLP; ``kv_dim`` is the memory's
    width when it differs from ``d_model``."""

    kv_dim: int | None = None

    def _attention(self, cross: bool = False) -> MultiHeadAttention:
        attn = super()._attention(cross)
        return replace(attn, kv_dim=self.kv_dim) if cross and self.kv_dim is not None else attn

    def _sublayers(self) -> dict[str, Layer]:
        layers = super()._sublayers()
        cross = {"cross_norm": self._norm(), "cross": self._attention(cross=True)}
        return {
            "attn_norm": layers["attn_norm"],
            "attn": layers["attn"],
            **cross,
            "mlp_norm": layers["mlp_norm"],
            "mlp": layers["mlp"],
        }

    def apply(  # type: ignore[override]
        self,
        params: Params,
        x: torch.Tensor,
        memory: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        memory_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        key: Key = None,
    ) -> torch.Tensor:
        """``mask``/``causal`` restrict self-attention, ``memory_mask`` cross-attention."""
        return self._forward(
            params,
            x,
            memory,
            mask=mask,
            causal=causal,
            memory_mask=memory_mask,
            positions=positions,
            key=key,
        )
