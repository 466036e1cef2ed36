"""Intermediates without plumbing: named taps in the layers, read or replaced from outside.

A layer marks a value worth looking at with ``tap(params, name, value)``. The site's full name
is the path of ``params`` in the tree the model was called with, then ``name``: in a GPT,
``blocks.3.attn.weights`` is block 3's attention weights. :func:`capture` runs a function and
returns what its taps saw; ``patch=`` replaces them as it runs. Outside a capture a tap is the
identity after one read of a module global, so ``apply`` keeps its return type and a compiled
step is unchanged (no graph break, no guard beyond that global).

Sites (each layer's own; paths come from the params tree):

========================  =========================================================
``<attn>.weights``         attention probabilities ``(..., heads, T, S)``, before dropout
``<attn>.heads``           each head's output ``(..., T, heads, head_dim)``, before ``o``
``<mlp>.hidden``           the MLP's activations ``(..., T, d_ff)``, before ``down``
``<block>.input``          a block's input, the residual stream ``(..., T, d_model)``
``<block>.output``         a block's output
``<embedding>.output``     an embedding lookup ``E[ids]`` (token, position or segment)
``<norm>.output``          a stack's final norm
========================  =========================================================

Sites are matched to paths by the identity of the params' sub-trees, so :func:`capture` must
be given the params the function passes on to its layers (call it inside ``vmap`` or ``grad``
rather than around them). One capture records one forward pass: a site reached twice is an
error. While a capture is open, stacks do not recompute blocks (``remat``), so patches hold in
the backward pass too.
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Patch", "PatchError", "active", "capture", "tap", "watched"]

Patch = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]

_OPEN = 0  # captures open in any thread: while 0, every tap is the identity
_local = threading.local()


class PatchError(ValueError):
    """A patch names no site of the run, or does not fit the value it replaces."""


@dataclass
class _Scope:
    paths: dict[int, str]
    keep: Callable[[str], bool]
    patches: Mapping[str, Patch]
    seen: dict[str, torch.Tensor] = field(default_factory=dict)
    reached: set[str] = field(default_factory=set)

    def site(self, params: Any, name: str) -> str | None:
        path = self.paths.get(id(params))
        if path is None:
            return None
        return f"{path}.{name}" if path else name

    def visit(self, site: str, value: torch.Tensor) -> torch.Tensor:
        if site in self.reached:
            raise PatchError(
                f"site {site!r} was reached twice in one capture: capture one forward pass "
                "(one call of each layer) at a time"
            )
        self.reached.add(site)
        if site in self.patches:
            value = _replace(site, value, self.patches[site])
        if self.keep(site):
            self.seen[site] = value
        return value


def _replace(site: str, value: torch.Tensor, patch: Patch) -> torch.Tensor:
    new = patch(value) if callable(patch) else patch
    if not isinstance(new, torch.Tensor):
        raise PatchError(f"patch {site!r}: expected a tensor, got {type(new).__name__}")
    if new.shape != value.shape:
        raise PatchError(
            f"patch {site!r}: the site's value has shape {tuple(value.shape)}, the patch "
            f"{tuple(new.shape)}"
        )
    if new.dtype != value.dtype:
        raise PatchError(
            f"patch {site!r}: the site's value is {value.dtype}, the patch {new.dtype}"
        )
    return new


def _current() -> _Scope | None:
    if not _OPEN:
        return None
    return getattr(_local, "scope", None)


def active() -> bool:
    """Whether a capture is open in this thread (stacks then skip rematerialisation)."""
    return _current() is not None


def tap(params: Any, name: str, value: torch.Tensor) -> torch.Tensor:
    """``value``, recorded as site ``<path of params>.name`` by an open :func:`capture` (or
    replaced by its patch); the identity otherwise."""
    scope = _current()
    if scope is None:
        return value
    site = scope.site(params, name)
    return value if site is None else scope.visit(site, value)


def watched(params: Any, name: str) -> bool:
    """Whether an open capture records or patches this site: a layer computes a value it would
    otherwise skip (attention weights beside the fused kernel) only when it is."""
    scope = _current()
    if scope is None:
        return False
    site = scope.site(params, name)
    return site is not None and (site in scope.patches or scope.keep(site))


def _paths(params: Any, prefix: str = "") -> dict[int, str]:
    """``id`` of every dict and list in ``params`` -> its dotted path."""
    found = {id(params): prefix}
    children: Iterable[tuple[Any, Any]]
    if isinstance(params, Mapping):
        children = params.items()
    elif isinstance(params, list | tuple):
        children = enumerate(params)
    else:
        return found
    for name, child in children:
        if isinstance(child, Mapping | list | tuple):
            found.update(_paths(child, f"{prefix}.{name}" if prefix else str(name)))
    return found


def _patterns(only: str | Iterable[str] | None) -> list[str] | None:
    return None if only is None else [only] if isinstance(only, str) else list(only)


def _matcher(patterns: list[str] | None) -> Callable[[str], bool]:
    if patterns is None:
        return lambda site: True
    return lambda site: any(fnmatch.fnmatchcase(site, p) for p in patterns)


def capture(
    fn: Callable[..., Any],
    params: Any,
    *args: Any,
    only: str | Iterable[str] | None = None,
    patch: Mapping[str, Patch] | None = None,
    **kwargs: Any,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """``fn(params, *args, **kwargs)`` and the values its taps saw, ``{site: tensor}``.

    ``only``: glob patterns of the sites to keep (``"blocks.*.attn.weights"``; all by default,
    none with ``()``).
    ``patch``: ``{site: tensor or function of the site's value}``: the site's value is replaced
    by it as the function runs (activation patching, ablation). A patch must keep the value's
    shape and dtype, and every patched site must be reached; both are errors naming the site.
    Pure: nothing outside the call changes, and the same inputs give the same outputs.
    """
    global _OPEN
    patches = dict(patch or {})
    patterns = _patterns(only)
    scope = _Scope(_paths(params), _matcher(patterns), patches)
    if getattr(_local, "scope", None) is not None:
        raise RuntimeError("capture: a capture is already open in this thread; nest none")
    _local.scope = scope
    _OPEN += 1
    try:
        out = fn(params, *args, **kwargs)
    finally:
        _OPEN -= 1
        _local.scope = None
    missed = sorted(set(patches) - scope.reached)
    if missed:
        raise PatchError(
            f"patch names {missed}, which the run never reached; its sites are "
            f"{_summary(scope.reached)}"
        )
    if patterns and scope.reached and not scope.seen:
        raise PatchError(
            f"capture: only={only!r} matches none of the sites {_summary(scope.reached)}"
        )
    if not scope.reached:
        raise PatchError(
            "capture: no tap saw the params it was given; call the model on them inside the "
            "capture (not a copy, and not around vmap or grad)"
        )
    return out, scope.seen


def _summary(sites: set[str], most: int = 12) -> str:
    ordered = sorted(sites, key=_natural)
    shown = ", ".join(ordered[:most])
    return shown + (f", ... ({len(ordered)} in all)" if len(ordered) > most else "")


def _natural(site: str) -> list[Any]:
    """Sort key putting ``blocks.10`` after ``blocks.9``."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in site.split(".")]
