"""What a model family tells the loader: how its config maps onto ours (both ways, refusing what
we cannot honour), its name table, and the tensors it ties or computes instead of storing."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from functional_llm.interop.hf.mapping import MappingError, Rule

__all__ = ["Family", "field_value", "require", "same_tensor"]

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    """One Hugging Face architecture and the model of ours it maps onto.

    ``prefix`` is the base model's name inside the task model's checkpoint (``transformer.``
    for GPT-2); a checkpoint of the bare base model lacks it and gets it added. ``untie`` fills
    in, after loading, the tensors the checkpoint leaves out because they are tied or computed;
    ``tie`` drops them again before saving and returns config fields that say so (and
    defaults the family needs, such as Marian's special ids).
    """

    model_type: str
    architecture: str
    prefix: str
    config_from_hf: Callable[[dict[str, Any]], Any]
    config_to_hf: Callable[[Any], dict[str, Any]]
    make_model: Callable[[Any], Any]
    rules: Callable[[Any], list[Rule]]
    ignore: tuple[str, ...] = ()  # regexes of tensors to skip: buffers, tied copies
    untie: Callable[[Tensors, dict[str, Any]], Tensors] = lambda t, c: t
    tie: Callable[[Tensors, Any], tuple[Tensors, dict[str, Any]]] = lambda t, c: (t, {})

    def ignored(self, names: Iterable[str]) -> list[str]:
        pattern = re.compile("|".join(f"(?:{p})" for p in self.ignore) or "(?!)")
        return [n for n in names if pattern.fullmatch(n)]


def field_value(config: dict[str, Any], name: str, default: Any = None) -> Any:
    """A config field, or ``default`` when it is absent or null."""
    value = config.get(name)
    return default if value is None else value


def require(config: dict[str, Any], name: str, allowed: Iterable[Any], default: Any) -> Any:
    """The field's value if it is one we honour, else a :class:`MappingError` naming it."""
    value, allowed = field_value(config, name, default), tuple(allowed)
    if value not in allowed:
        kind = config.get("model_type", "this")
        raise MappingError(
            f"config.json: {name}={value!r} is not supported for {kind} models "
            f"(supported: {', '.join(map(repr, allowed))})"
        )
    return value


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b))
