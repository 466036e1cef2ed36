"""Path-aware helpers for parameter pytrees, on top of optree.

A pytree here is any nesting of dicts, lists and tuples whose leaves are tensors (or other
values). Each leaf has a *path*: the keys and indices that lead to it, joined by dots,
e.g. ``blocks.0.attn.wq``. Paths are what users type to select, freeze, shard or inspect
parameters, so every helper here speaks them.

``None`` is an empty subtree, as in optree and JAX: :func:`partition` puts ``None`` where a
leaf was not selected and :func:`combine` fills those holes back in.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable
from typing import Any

import optree
import torch

from functional_llm.types import PyTree

Pattern = str | re.Pattern[str]

__all__ = [
    "combine",
    "compile_pattern",
    "flatten",
    "flatten_axes",
    "leaves",
    "map",
    "map_with_path",
    "mask",
    "matches",
    "nbytes",
    "partition",
    "paths",
    "require_matches",
    "select",
    "size",
    "structure",
    "summary",
    "unflatten",
]


def _join(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def leaves(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> list[Any]:
    """The leaves of ``tree`` in optree's canonical order (dict keys sorted); ``is_leaf``
    stops the walk at the nodes it accepts (a packed weight, say)."""
    return optree.tree_leaves(tree, is_leaf=is_leaf)


def structure(tree: PyTree) -> optree.PyTreeSpec:
    """The tree's structure (optree treespec), for ``optree.tree_unflatten``."""
    return optree.tree_structure(tree)


def paths(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> list[str]:
    """Dotted path of every leaf, in the same order as :func:`leaves`."""
    return [_join(p) for p in optree.tree_paths(tree, is_leaf=is_leaf)]


def map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """``fn(leaf, *other_leaves)`` over matching leaves of trees of one structure."""
    return optree.tree_map(fn, tree, *rest)


def map_with_path(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """``fn(path, leaf, *other_leaves)`` over matching leaves; ``path`` is the dotted path."""
    # Built on tree_paths rather than optree.tree_map_with_path: under torch.compile, dynamo's
    # polyfill of the latter hands the function wrong paths (torch 2.13), silently.
    leaves_, spec = optree.tree_flatten(tree)
    others = [spec.flatten_up_to(r) for r in rest]
    mapped = [fn(p, *xs) for p, *xs in zip(paths(tree), leaves_, *others, strict=True)]
    return optree.tree_unflatten(spec, mapped)


def flatten(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """``{path: leaf}`` for every leaf, in canonical order (``is_leaf`` as in :func:`leaves`).

    The inverse is :func:`unflatten`; pass ``like=`` there to restore tuples or lists
    exactly, otherwise the structure is rebuilt from the paths alone.
    """
    return dict(zip(paths(tree, is_leaf), leaves(tree, is_leaf), strict=True))


def unflatten(flat: dict[str, Any], like: PyTree | None = None) -> PyTree:
    """Rebuild a tree from ``{path: leaf}``.

    With ``like`` the result has exactly ``like``'s structure (missing or extra paths raise
    ``KeyError`` naming them). Without it, nested dicts are built from the dotted paths and a
    dict whose keys are exactly ``"0" .. "n-1"`` becomes a list.
    """
    if like is not None:
        expected = paths(like)
        missing = [p for p in expected if p not in flat]
        extra = sorted(set(flat) - set(expected))
        if missing or extra:
            raise KeyError(f"paths do not match the template: missing {missing}, extra {extra}")
        return optree.tree_unflatten(structure(like), [flat[p] for p in expected])
    root: dict[str, Any] = {}
    for path, leaf in flat.items():
        *parents, last = path.split(".")
        node = root
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {path!r} passes through a leaf at {part!r}")
        if last in node:
            raise ValueError(f"path {path!r} names a subtree and a leaf")
        node[last] = leaf
    return _lists_from_digit_dicts(root)


def _lists_from_digit_dicts(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    children = {k: _lists_from_digit_dicts(v) for k, v in node.items()}
    if children and set(children) == {str(i) for i in range(len(children))}:
        return [children[str(i)] for i in range(len(children))]
    return children


def compile_pattern(pattern: Pattern) -> re.Pattern[str]:
    """A glob (over the whole dotted path) or a regex (searched anywhere) as one regex to
    ``search`` with. Precompiled patterns also work inside ``torch.compile``d code."""
    if isinstance(pattern, re.Pattern):
        return pattern
    return re.compile("^" + fnmatch.translate(pattern))


def matches(path: str, *patterns: Pattern) -> bool:
    """Whether a dotted path matches any glob (whole path) or regex (searched) pattern.

    Paths and patterns are static, so inside ``torch.compile`` the answer is computed once at
    trace time (``assume_constant_result``) and ``select``/``mask`` work in compiled code."""
    return any(compile_pattern(p).search(path) for p in patterns)


# What ``torch.compiler.assume_constant_result`` does (torch 2.13), without importing dynamo
# (a second of import time) before anything is compiled; tests/test_imports.py checks that
# the decorator still sets exactly this.
matches._dynamo_marked_constant = True  # type: ignore[attr-defined]


def mask(tree: PyTree, *patterns: Pattern) -> PyTree:
    """A tree of bools: True where the leaf's path matches any pattern.

    A string pattern is a glob over the whole dotted path (``*`` also crosses dots:
    ``"*.norm*"``, ``"blocks.[01].*"``); a compiled ``re.Pattern`` is searched anywhere in it.
    """
    return map_with_path(lambda path, _: matches(path, *patterns), tree)


def select(tree: PyTree, *patterns: Pattern, allow_empty: bool = False) -> dict[str, Any]:
    """``{path: leaf}`` for the leaves whose path matches any pattern (see :func:`mask`).

    A pattern that matches no path is a ``ValueError`` naming it (a typo would otherwise
    select nothing, silently), unless ``allow_empty``."""
    flat = flatten(tree)
    if not allow_empty:
        require_matches("select", list(flat), patterns)
    return {p: x for p, x in flat.items() if matches(p, *patterns)}


def require_matches(what: str, paths: list[str], patterns: tuple[Pattern, ...]) -> None:
    """A ``ValueError`` naming every pattern that matches none of ``paths``."""
    unmatched = [p for p in patterns if not any(matches(path, p) for path in paths)]
    if unmatched:
        shown = ", ".join(repr(getattr(p, "pattern", p)) for p in unmatched)
        sample = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
        raise ValueError(f"{what}: {shown} matches no path (paths: {sample})")


def partition(tree: PyTree, where: PyTree | Callable[[str, Any], bool]) -> tuple[PyTree, PyTree]:
    """Split ``tree`` into ``(selected, rest)`` of the same structure, ``None`` in the holes.

    ``where`` is a bool tree (e.g. from :func:`mask`) or a predicate ``(path, leaf) -> bool``.
    ``combine(selected, rest)`` gives back ``tree``. Holes already in ``tree`` stay holes.
    """
    flags = map_with_path(where, tree) if callable(where) else where
    selected = optree.tree_map(lambda x, keep: x if keep else None, tree, flags, none_is_leaf=True)
    rest = optree.tree_map(lambda x, keep: None if keep else x, tree, flags, none_is_leaf=True)
    return selected, rest


def combine(*trees: PyTree) -> PyTree:
    """Merge trees of one structure leaf by leaf, taking the first non-``None`` leaf."""

    def first(*xs: Any) -> Any:
        return next((x for x in xs if x is not None), None)

    return optree.tree_map(first, *trees, none_is_leaf=True)


def _tensors(tree: PyTree) -> list[torch.Tensor]:
    return [x for x in leaves(tree) if isinstance(x, torch.Tensor)]


def size(tree: PyTree) -> int:
    """Total number of elements in the tree's tensor leaves (the parameter count)."""
    return sum(x.numel() for x in _tensors(tree))


def nbytes(tree: PyTree) -> int:
    """Total bytes of the tree's tensor leaves (logical sizes; meta tensors count too)."""
    return sum(x.numel() * x.element_size() for x in _tensors(tree))


def summary(tree: PyTree, axes: PyTree | None = None) -> str:
    """A table with one row per leaf: path, shape, dtype, element count, logical axes.

    ``axes`` is a tree of the same structure whose leaves are tuples of logical axis names,
    as a layer's ``axes()`` returns.
    """
    flat = flatten(tree)
    axes_flat = flatten_axes(axes) if axes is not None else {}
    header = ("path", "shape", "dtype", "count", "axes")
    rows = [
        (
            path,
            "x".join(str(d) for d in x.shape) or "scalar",
            str(x.dtype).removeprefix("torch."),
            f"{x.numel():,}",
            ", ".join(str(a) for a in axes_flat.get(path, ())),
        )
        for path, x in flat.items()
        if isinstance(x, torch.Tensor)
    ]
    rows.append(("total", "", "", f"{size(tree):,}", _human_bytes(nbytes(tree))))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    numeric = {3}

    def fmt(row: tuple[str, ...]) -> str:
        cells = [
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(r) for r in rows[:-1]), rule, fmt(rows[-1])])


def flatten_axes(axes: PyTree) -> dict[str, tuple]:
    """Axes trees have tuples as leaves; flatten them without descending into the tuples."""
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, str | None) for a in x)  # noqa: E731
    flat = optree.tree_flatten_with_path(axes, is_leaf=is_axes, none_is_leaf=True)
    return {_join(p): leaf for p, leaf in zip(flat[0], flat[1], strict=True)}


def _human_bytes(n: int) -> str:
    if n == 0:
        return "0 B"
    unit = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024**unit:.1f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][unit]}"
