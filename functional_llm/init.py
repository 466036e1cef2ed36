"""Parameter initializers: small frozen dataclasses, ``init(key, shape, dtype) -> tensor``.

They are values, not closures, so a config that holds one stays hashable and comparable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from functional_llm import random

__all__ = ["Constant", "Initializer", "Normal", "TruncatedNormal", "Uniform", "fan_in_uniform"]


@dataclass(frozen=True)
class Normal:
    """``N(0, std^2)``."""

    std: float = 1.0

    def __call__(
        self, key: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        return random.normal(key, shape, dtype, std=self.std)


@dataclass(frozen=True)
class TruncatedNormal:
    """``N(0, std^2)`` truncated to ``[-bound * std, bound * std]``."""

    std: float = 1.0
    bound: float = 2.0

    def __call__(
        self, key: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        return random.truncated_normal(key, shape, dtype, -self.bound, self.bound, self.std)


@dataclass(frozen=True)
class Uniform:
    """``U(-scale, scale)``."""

    scale: float

    def __call__(
        self, key: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        return random.uniform(key, shape, dtype, -self.scale, self.scale)


@dataclass(frozen=True)
class Constant:
    """Every element equal to ``value`` (zeros for biases, ones for norm scales)."""

    value: float = 0.0

    def __call__(
        self, key: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        return torch.full(shape, self.value, dtype=dtype, device=key.device)


Initializer = Normal | TruncatedNormal | Uniform | Constant


def fan_in_uniform(fan_in: int) -> Uniform:
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: ``torch.nn.Linear``'s default distribution."""
    return Uniform(1.0 / math.sqrt(fan_in))
