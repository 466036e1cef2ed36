"""Token embedding, with the tied unembedding ``logits = h E^T``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from functional_llm.init import Initializer, Normal
from functional_llm.nn.module import Layer, Params
from functional_llm.nn.taps import tap

__all__ = ["Embedding"]


@dataclass(frozen=True, kw_only=True)
class Embedding(Layer):
    """A ``(num, dim)`` table: ``apply`` looks rows up, ``attend`` projects back onto them."""

    num: int
    dim: int
    axes_names: tuple[str | None, str | None] = ("vocab", "embed")
    init_fn: Initializer | None = None  # None: N(0, 1), torch.nn.Embedding's default
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.num <= 0 or self.dim <= 0:
            raise ValueError(
                f"Embedding needs num > 0 and dim > 0, got num={self.num}, dim={self.dim}"
            )

    def init(self, key: torch.Tensor) -> Params:
        init_fn = self.init_fn or Normal(1.0)
        return {"table": init_fn(key, (self.num, self.dim), self.dtype)}

    def axes(self) -> Params:
        return {"table": self.axes_names}

    def apply(self, params: Params, ids: torch.Tensor) -> torch.Tensor:
        """``table[ids]``: ``(...,)`` integer ids to ``(..., dim)`` vectors (tap ``output``)."""
        return tap(params, "output", params["table"][ids])

    @staticmethod
    def attend(params: Params, h: torch.Tensor) -> torch.Tensor:
        """Tied unembedding: ``(..., dim) -> (..., num)`` scores ``h @ table^T``."""
        return h @ params["table"].T
