"""Helpers for property-based tests of models and steps: tree-aware comparisons whose
failures name the parameter path, and hypothesis strategies for keys and small configs.

    from functional_llm import testing
    testing.assert_trees_close(grads_eager, grads_compiled, rtol=1e-5, atol=1e-6)

    @hypothesis.given(cfg=testing.gpt_configs(), key=testing.keys())
    def test_causal(cfg, key): ...

hypothesis is imported only by the strategies, so the assertions work without it.
"""

from __future__ import annotations

from typing import Any

import torch

from functional_llm import random, tree

__all__ = ["assert_trees_close", "assert_trees_equal", "gpt_configs", "keys"]


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
            if close:
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


def keys() -> Any:
    """A hypothesis strategy of random keys (any 64-bit seed)."""
    from hypothesis import strategies as st

    return st.integers(0, 2**64 - 1).map(lambda seed: random.key(seed - 2**63))


def gpt_configs(
    max_layers: int = 2,
    max_heads: int = 4,
    flavours: tuple[str, ...] = ("gpt2", "llama"),
    **fixed: Any,
) -> Any:
    """A hypothesis strategy of tiny :class:`~functional_llm.models.GPTConfig` s: GPT-2 or
    Llama flavour, 1 to ``max_layers`` layers, heads, grouped kv heads, even head dims;
    ``fixed`` fields are kept as given."""
    from hypothesis import strategies as st

    from functional_llm.models import GPTConfig

    @st.composite
    def build(draw: Any) -> GPTConfig:
        n_heads = draw(st.integers(1, max_heads))
        head_dim = draw(st.sampled_from([2, 4, 8]))
        kv_divisors = [d for d in range(1, n_heads + 1) if n_heads % d == 0]
        fields = {
            "vocab_size": draw(st.integers(2, 40)),
            "max_seq_len": draw(st.integers(4, 32)),
            "d_model": n_heads * head_dim,
            "n_layers": draw(st.integers(1, max_layers)),
            "n_heads": n_heads,
            **fixed,
        }
        if draw(st.sampled_from(flavours)) == "llama":
            fields.setdefault("n_kv_heads", draw(st.sampled_from(kv_divisors)))
            return GPTConfig.llama(**fields)
        return GPTConfig(**fields)

    return build()
