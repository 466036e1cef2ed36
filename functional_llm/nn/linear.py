"""Linear (dense) layer: ``y = x W + b`` over one or more input and output axes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from functional_llm import random
from functional_llm.init import Constant, Initializer, fan_in_uniform
from functional_llm.nn.module import Layer, Params

__all__ = ["Linear", "is_packed"]

Dims = int | tuple[int, ...]


def is_packed(w: object) -> bool:
    """A weight stored in another form (a quantised one, :mod:`functional_llm.compress`): it
    has the float weight's ``shape`` and multiplies ``(rows, fan_in)`` inputs itself
    (``w.linear(x2)``). Shape checks treat it as one leaf."""
    return getattr(w, "packed_weight", False) is True


def _tuple(d: Dims) -> tuple[int, ...]:
    return (d,) if isinstance(d, int) else tuple(d)


@dataclass(frozen=True, kw_only=True)
class Linear(Layer):
    """``y = x W + b`` with ``W`` of shape ``(*in_dims, *out_dims)``.

    Several output dims give e.g. per-head projections ``(d_model, heads, head_dim)`` whose
    ``heads`` axis a sharding rule can split; several input dims contract them all.
    ``w_init`` defaults to ``torch.nn.Linear``'s ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
    """

    in_dims: Dims
    out_dims: Dims
    bias: bool = True
    in_axes: tuple[str | None, ...] = ("embed",)
    out_axes: tuple[str | None, ...] = ("mlp",)
    w_init: Initializer | None = None
    b_init: Initializer | None = None
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for field, dims, axes in (
            ("in", self.in_dims, self.in_axes),
            ("out", self.out_dims, self.out_axes),
        ):
            if any(d <= 0 for d in _tuple(dims)):
                raise ValueError(f"Linear.{field}_dims must be positive, got {dims}")
            if len(axes) != len(_tuple(dims)):
                raise ValueError(
                    f"Linear.{field}_axes {axes} must name each of {field}_dims {dims}"
                )

    @property
    def fan_in(self) -> int:
        return math.prod(_tuple(self.in_dims))

    def init(self, key: torch.Tensor) -> Params:
        k_w, k_b = random.split(key)
        w_init = self.w_init or fan_in_uniform(self.fan_in)
        params = {"w": w_init(k_w, _tuple(self.in_dims) + _tuple(self.out_dims), self.dtype)}
        if self.bias:
            b_init = self.b_init or Constant(0.0)
            params["b"] = b_init(k_b, _tuple(self.out_dims), self.dtype)
        return params

    def axes(self) -> Params:
        axes = {"w": self.in_axes + self.out_axes}
        if self.bias:
            axes["b"] = self.out_axes
        return axes

    def apply(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        n_in, out = len(_tuple(self.in_dims)), _tuple(self.out_dims)
        lead = x.shape[: x.ndim - n_in]
        x2 = x.reshape(-1, self.fan_in)
        w = params["w"]
        if is_packed(w):
            y = w.linear(x2)
            y = y + params["b"].reshape(-1) if self.bias else y
            return y.reshape(*lead, *out)
        w2 = w.reshape(self.fan_in, -1)
        # One addmm (as torch.nn.Linear does) rather than a matmul and a separate add.
        y = torch.addmm(params["b"].reshape(-1), x2, w2) if self.bias else x2 @ w2
        return y.reshape(*lead, *out)
