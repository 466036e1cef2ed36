"""Position-wise feed-forward network.

Plain:  ``y = W_down act(W_up x)`` with act in relu, gelu (exact), gelu_tanh, silu.
Gated (Shazeer 2020): ``y = W_down (act(W_gate x) * W_up x)``; ``swiglu`` (silu gate, Llama)
and ``geglu`` (gelu gate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from functional_llm.init import Initializer
from functional_llm.nn.dropout import dropout
from functional_llm.nn.linear import Linear
from functional_llm.nn.module import Layer, Params, axes_of, init_all
from functional_llm.nn.taps import tap
from functional_llm.types import Activation

__all__ = ["ACTIVATIONS", "MLP"]

ACTIVATIONS: dict[Activation, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swiglu": F.silu,
    "geglu": F.gelu,
}
_GATED = {"swiglu", "geglu"}


@dataclass(frozen=True, kw_only=True)
class MLP(Layer):
    d_model: int
    d_ff: int
    activation: Activation = "gelu"
    bias: bool = True
    dropout: float = 0.0
    w_init: Initializer | None = None
    out_init: Initializer | None = None
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"MLP.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.d_model <= 0 or self.d_ff <= 0:
            raise ValueError(f"MLP needs d_model > 0 and d_ff > 0, got {self.d_model}, {self.d_ff}")

    @property
    def gated(self) -> bool:
        return self.activation in _GATED

    def _layers(self) -> dict[str, Linear]:
        up = Linear(
            in_dims=self.d_model,
            out_dims=self.d_ff,
            bias=self.bias,
            in_axes=("embed",),
            out_axes=("mlp",),
            w_init=self.w_init,
            dtype=self.dtype,
        )
        down = Linear(
            in_dims=self.d_ff,
            out_dims=self.d_model,
            bias=self.bias,
            in_axes=("mlp",),
            out_axes=("embed",),
            w_init=self.out_init or self.w_init,
            dtype=self.dtype,
        )
        return {"up": up, "gate": up, "down": down} if self.gated else {"up": up, "down": down}

    def init(self, key: torch.Tensor) -> Params:
        return init_all(self._layers(), key)

    def axes(self) -> Params:
        return axes_of(self._layers())

    def apply(
        self, params: Params, x: torch.Tensor, *, key: torch.Tensor | None = None
    ) -> torch.Tensor:
        layers, act = self._layers(), ACTIVATIONS[self.activation]
        h = layers["up"].apply(params["up"], x)
        h = act(layers["gate"].apply(params["gate"], x)) * h if self.gated else act(h)
        h = tap(params, "hidden", h)
        return layers["down"].apply(params["down"], dropout(h, self.dropout, key=key))
