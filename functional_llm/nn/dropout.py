"""Dropout driven by an explicit key: ``y = x * m / (1 - rate)``, ``m ~ Bernoulli(1 - rate)``.

Evaluation is explicit, as Equinox's ``inference`` flag and Flax's ``deterministic`` make it:
dropout with ``rate > 0`` and no key is an error (a forgotten key must not silently train without
dropout). To evaluate, call :func:`inference` on the model first: the same model with every
dropout rate 0, which then runs without a key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from functional_llm import random
from functional_llm.nn.module import Layer, Params

__all__ = ["Dropout", "dropout", "inference"]

L = TypeVar("L")


def dropout(x: torch.Tensor, rate: float, *, key: torch.Tensor | None) -> torch.Tensor:
    """Zero each element with probability ``rate`` and rescale the rest; identity at rate 0.
    ``rate > 0`` needs a key (to evaluate, use the model :func:`inference` gives)."""
    if rate == 0.0:
        return x
    if key is None:
        raise ValueError(
            f"dropout rate {rate} without a key: pass key= to train, or evaluate "
            "fl.nn.inference(model), the same model with every dropout rate 0"
        )
    if rate == 1.0:
        return torch.zeros_like(x)
    keep = random.bernoulli(key, 1.0 - rate, x.shape)
    return torch.where(keep, x / (1.0 - rate), torch.zeros((), dtype=x.dtype, device=x.device))


def inference(layer: L) -> L:
    """``layer`` (a layer, a model, a config) for evaluation: the same frozen value with every
    dropout rate set to 0, in it and in every layer or config it holds (Equinox's
    ``inference_mode``). Pure: ``layer`` itself is unchanged, and equal inputs give equal
    results, so caches keyed on the layer keep working."""
    if not dataclasses.is_dataclass(layer) or isinstance(layer, type):
        return layer
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(layer):
        if not f.init:
            continue
        value = getattr(layer, f.name)
        is_rate = isinstance(value, int | float) and not isinstance(value, bool)
        if is_rate and ("dropout" in f.name or (isinstance(layer, Dropout) and f.name == "rate")):
            if value != 0:
                changes[f.name] = 0.0
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            evaluated = inference(value)
            if evaluated is not value:
                changes[f.name] = evaluated
    return dataclasses.replace(layer, **changes) if changes else layer  # type: ignore[type-var]


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
