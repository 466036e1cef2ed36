"""Normalisation layers.

LayerNorm: ``y = (x - mean(x)) / sqrt(var(x) + eps) * g + b`` over the last axis.
RMSNorm:   ``y = x / sqrt(mean(x^2) + eps) * g`` (Zhang & Sennrich 2019; Llama).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from functional_llm.nn.module import Layer, Params
from functional_llm.types import NormKind

__all__ = ["LayerNorm", "RMSNorm", "make_norm"]


@dataclass(frozen=True, kw_only=True)
class LayerNorm(Layer):
    dim: int
    eps: float = 1e-5
    bias: bool = True
    dtype: torch.dtype = torch.float32

    def init(self, key: torch.Tensor) -> Params:
        params = {"scale": torch.ones(self.dim, dtype=self.dtype, device=key.device)}
        if self.bias:
            params["bias"] = torch.zeros(self.dim, dtype=self.dtype, device=key.device)
        return params

    def axes(self) -> Params:
        return {"scale": ("embed",), "bias": ("embed",)} if self.bias else {"scale": ("embed",)}

    def apply(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,), params["scale"], params.get("bias"), self.eps)


@dataclass(frozen=True, kw_only=True)
class RMSNorm(Layer):
    dim: int
    eps: float = 1e-6
    dtype: torch.dtype = torch.float32

    def init(self, key: torch.Tensor) -> Params:
        return {"scale": torch.ones(self.dim, dtype=self.dtype, device=key.device)}

    def axes(self) -> Params:
        return {"scale": ("embed",)}

    def apply(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.dim,), params["scale"], self.eps)


def make_norm(
    kind: NormKind, dim: int, eps: float, bias: bool, dtype: torch.dtype
) -> LayerNorm | RMSNorm:
    """``"layernorm"`` or ``"rmsnorm"`` by name (the configs' ``norm`` field)."""
    if kind == "layernorm":
        return LayerNorm(dim=dim, eps=eps, bias=bias, dtype=dtype)
    if kind == "rmsnorm":
        return RMSNorm(dim=dim, eps=eps, dtype=dtype)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")
