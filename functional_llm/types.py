"""The library's shared types and conventions, in one place (the lowest module: it imports only
torch).

* ``PyTree``, ``Params``: nested dicts, lists and tuples with tensor leaves;
* ``Key``: a Threefry key (:mod:`functional_llm.random`); ``None`` where no randomness is used;
* ``Batch``, ``Metrics``, ``LossFn``: what a train step consumes and reports;
* ``Activation``, ``NormKind``: the names a config may give (checked on construction);
* :class:`Module`, :class:`Backbone`, :class:`DecoderLM`: what a layer, a fine-tuning backbone
  and a decoder-only language model provide, as protocols (any object with the methods fits);
* ``IGNORE``: the label that no loss counts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol, TypeAlias, get_args

import torch

__all__ = [
    "ACTIVATION_NAMES",
    "IGNORE",
    "Activation",
    "Backbone",
    "Batch",
    "DecoderLM",
    "Key",
    "LossFn",
    "Metrics",
    "Module",
    "NormKind",
    "Params",
    "PyTree",
]

PyTree: TypeAlias = Any
Params: TypeAlias = Any  # a PyTree of tensors: a layer's parameters
Key: TypeAlias = torch.Tensor
Batch: TypeAlias = Mapping[str, torch.Tensor]
Metrics: TypeAlias = dict[str, torch.Tensor]
LossFn: TypeAlias = Callable[[Params, Batch, "Key | None"], tuple[torch.Tensor, Metrics]]

Activation = Literal["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"]
ACTIVATION_NAMES: tuple[str, ...] = get_args(Activation)
NormKind = Literal["layernorm", "rmsnorm"]

IGNORE = -100  # the target that is not counted (torch's and Hugging Face's convention)


class Module(Protocol):
    """A layer or model: static settings plus pure ``init``, ``apply`` and ``axes``."""

    def init(self, key: Key) -> Params: ...

    def axes(self) -> Params: ...

    def apply(self, params: Params, *args: Any, **kwargs: Any) -> Any: ...


class Backbone(Module, Protocol):
    """A model fine-tuning heads stand on (BERT, GPT): hidden states, and one vector per
    sequence. ``config`` has at least ``d_model``, ``init_std`` and ``dtype``."""

    @property
    def config(self) -> Any: ...

    def hidden_states(
        self,
        params: Params,
        tokens: torch.Tensor,
        *,
        valid: torch.Tensor | None = None,
        key: Key | None = None,
    ) -> torch.Tensor: ...

    def pool(
        self, params: Params, h: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor: ...


class DecoderLM(Module, Protocol):
    """A decoder-only language model: ``tokens (..., T)`` to next-token logits
    ``(..., T, vocab)``."""

    @property
    def config(self) -> Any: ...

    def apply(
        self,
        params: Params,
        tokens: torch.Tensor,
        *,
        valid: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        key: Key | None = None,
    ) -> torch.Tensor: ...
