"""Tree-aware comparisons whose failures name each differing leaf by its dotted path."""

from __future__ import annotations

from typing import Any

import torch

from functional_llm import tree

__all__ = ["assert_trees_close", "assert_trees_equal"]


def _compare(actual: Any, expected: Any, close: bool, rtol: float, atol: float) -> None:
    if tree.structure(actual) != tree.structure(expected):
        got, want = set(tree.paths(actual)), set(tree.paths(expected))
        raise AssertionError(
            f"tree structures differ: missing {sorted(want - got)}, extra {sorted(got - want)}"
            if got != want
            else f"tree structures differ: {tree.structure(actual)} vs {tree.structure(expected)}"
        )
    failures = []
    for path, a, b in zip(
        tree.paths(actual), tree.leaves(actual), tree.leaves(expected), strict=True
    ):
        try:
            if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
                if a != b:  # plain values (ints, strings) in a tree compare exactly
                    raise AssertionError(f"{a!r} != {b!r}")
            elif close:
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
            elif not (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)):
                diff = (
                    (a.double() - b.double()).abs().max().item() if a.shape == b.shape else "shape"
                )
                raise AssertionError(f"not bitwise equal (max |diff| {diff})")
        except AssertionError as err:
            failures.append(f"{path}: {str(err).strip().splitlines()[0]}")
    if failures:
        raise AssertionError(
            f"{len(failures)} of {len(tree.leaves(actual))} leaves differ:\n  "
            + "\n  ".join(failures)
        )


def assert_trees_close(
    actual: Any, expected: Any, *, rtol: float = 1.3e-6, atol: float = 1e-5
) -> None:
    """Same structure, and every leaf close (``torch.testing.assert_close``); the error lists
    each differing leaf by its dotted path."""
    _compare(actual, expected, True, rtol, atol)


def assert_trees_equal(actual: Any, expected: Any) -> None:
    """Same structure, and every leaf bitwise equal (shape, dtype and values)."""
    _compare(actual, expected, False, 0.0, 0.0)
