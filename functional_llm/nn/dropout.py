"""Dropout driven by an explicit key: ``y = x * m / (1 - rate)``, ``m ~ Bernoulli(1 - rate)``.

No key means no dropout (evaluation), so the same function serves training and inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from functional_llm import random
from functional_llm.nn.module import Layer, Params

__all__ = ["Dropout", "dropout"]


def dropout(x: torch.Tensor, rate: float, *, key: torch.Tensor | None) -> torch.Tensor:
    """Zero each element with probability ``rate`` and rescale the rest; identity if no key."""
    if key is None or rate == 0.0:
        return x
    if rate == 1.0:
        return torch.zeros_like(x)
    keep = random.bernoulli(key, 1.0 - rate, x.shape)
    return torch.where(keep, x / (1.0 - rate), torch.zeros((), dtype=x.dtype, device=x.device))


@dataclass(frozen=True, kw_only=True)
class Dropout(Layer):
    rate: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"Dropout.rate must be in [0, 1], got {self.rate}")

    def init(self, key: torch.Tensor) -> Params:
        return {}

    def axes(self) -> Params:
        return {}

    def apply(
        self, params: Params, x: torch.Tensor, *, key: torch.Tensor | None = None
    ) -> torch.Tensor:
        return dropout(x, self.rate, key=key)
