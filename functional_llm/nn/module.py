"""The layer protocol, and the shape checks every layer gets from it.

A layer is a frozen dataclass of its static settings with three methods:

* ``init(key) -> params``: a pytree of tensors, a pure function of the key;
* ``apply(params, *inputs, key=None, ...) -> outputs``: pure; the key drives dropout, and a
  layer with dropout needs one (evaluate :func:`functional_llm.nn.inference` of it instead);
* ``axes() -> tree``: the structure of ``params`` with, at each leaf, a tuple of logical
  axis names (``("embed", "mlp")``) that sharding rules map onto a device mesh.

:class:`Layer` adds ``shapes()`` (the params' shapes without allocating them) and
``check(params)`` (a clear error naming the parameter path and both shapes).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import optree
import torch

from functional_llm import random, tree
from functional_llm.types import Params

__all__ = ["Layer", "axes_of", "check_tree", "eval_shape", "init_all", "maybe_split"]


def eval_shape(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on the meta device: the result's shapes and dtypes, no memory, no compute.

    Tensor arguments are moved to ``meta`` first. ``eval_shape(model.init, key)`` sizes a
    7B-parameter model in well under a second.
    """
    to_meta = lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x  # noqa: E731
    meta_args = [optree.tree_map(to_meta, a) for a in args]
    meta_kwargs = {k: optree.tree_map(to_meta, v) for k, v in kwargs.items()}
    with torch.device("meta"):
        return fn(*meta_args, **meta_kwargs)


@functools.lru_cache(maxsize=256)
def _shape_spec(layer: Any) -> tuple[optree.PyTreeSpec, tuple[tuple[torch.Size, torch.dtype], ...]]:
    """The params' structure and each leaf's shape and dtype: immutable, so safe to cache."""
    leaves, spec = optree.tree_flatten(eval_shape(layer.init, random.key(0)))
    return spec, tuple((x.shape, x.dtype) for x in leaves)


def _shapes(layer: Any) -> Params:
    """A fresh params tree of meta tensors: a caller may change it without affecting others."""
    spec, leaves = _shape_spec(layer)
    return optree.tree_unflatten(
        spec, [torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in leaves]
    )


def check_tree(params: Params, expected: Params, name: str = "params") -> None:
    """Raise ``ValueError`` unless ``params`` has ``expected``'s structure and leaf shapes.

    The message names each offending path (``params.blocks.0.attn.q.w``) and both shapes.
    """
    from functional_llm.nn.linear import is_packed  # a packed (quantised) weight is one leaf

    leaves, spec = optree.tree_flatten(params, is_leaf=is_packed)
    want_leaves, want_spec = optree.tree_flatten(expected)
    if spec == want_spec and all(
        tuple(x.shape) == tuple(w.shape) for x, w in zip(leaves, want_leaves, strict=True)
    ):
        return
    got = tree.flatten(params, is_leaf=is_packed)
    want = tree.flatten(expected)
    problems = [
        f"{name}.{p}: missing (expected shape {tuple(want[p].shape)})" for p in want if p not in got
    ]
    problems += [f"{name}.{p}: unexpected entry" for p in got if p not in want]
    problems += [
        f"{name}.{p}: expected shape {tuple(want[p].shape)}, got {tuple(getattr(x, 'shape', ()))}"
        for p, x in got.items()
        if p in want and tuple(getattr(x, "shape", ())) != tuple(want[p].shape)
    ]
    raise ValueError("parameters do not fit the layer:\n  " + "\n  ".join(problems))


def init_all(layers: Mapping[str, Any], key: torch.Tensor) -> Params:
    """``{name: layer.init(k)}`` with one key split off ``key`` per named sub-layer."""
    keys = random.split(key, len(layers))
    return {name: layer.init(k) for (name, layer), k in zip(layers.items(), keys, strict=True)}


def axes_of(layers: Mapping[str, Any]) -> Params:
    """``{name: layer.axes()}`` for named sub-layers."""
    return {name: layer.axes() for name, layer in layers.items()}


def maybe_split(key: torch.Tensor | None, n: int = 2) -> list[torch.Tensor | None]:
    """``n`` keys split from ``key``, or ``n`` Nones when there is no key (no dropout)."""
    return [None] * n if key is None else list(random.split(key, n))


class Layer:
    """Base for layers (frozen dataclasses defining ``init``, ``apply`` and ``axes``)."""

    # Each layer defines these (the protocol at the top of this module); declared here so code
    # holding any ``Layer`` type-checks. ``apply``'s inputs differ from layer to layer.
    init: Callable[[torch.Tensor], Params]
    axes: Callable[[], Params]
    apply: Callable[..., Any]

    def shapes(self) -> Params:
        """The params tree as meta tensors (shapes and dtypes only); a fresh tree each call, built
        from a description cached per config."""
        return _shapes(self)

    def check(self, params: Params, name: str = "params") -> None:
        """Raise ``ValueError`` naming the path and both shapes if ``params`` don't fit.

        Skipped while ``torch.compile`` traces (its meta-device evaluation cannot be traced);
        run the function once eagerly, or call ``check`` yourself, for the readable error.
        """
        if torch.compiler.is_compiling():
            return
        want_spec, want = _shape_spec(self)
        leaves, spec = optree.tree_flatten(params)
        if spec != want_spec or any(
            x.shape != shape for x, (shape, _) in zip(leaves, want, strict=True)
        ):
            check_tree(params, _shapes(self), name)  # raises, naming each path
