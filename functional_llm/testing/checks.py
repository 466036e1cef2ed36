"""Ready checks of the properties every model and optimizer of this library has, for your own:
each raises an ``AssertionError`` that says what differed, and returns nothing otherwise.

    check_causal(lambda t: model.apply(params, t), tokens, vocab_size)
    check_padding_invariance(lambda t, v: model.apply(params, t, valid=v), tokens, valid, vocab)
    check_batch_independence(lambda t: model.apply(params, t), tokens)
    check_transforms_agree(lambda t: model.apply(params, t), tokens, compile=True)
    check_gradients(lambda p: loss_fn(p, batch, None)[0], params, key)
    check_optimizer_pure(optimizer, params, grads)
    check_state_round_trip(optimizer, params, grads, tmp_path)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optree
import torch

from functional_llm import random, tree
from functional_llm.testing.trees import assert_trees_close, assert_trees_equal
from functional_llm.train import value_and_grad

__all__ = [
    "check_batch_independence",
    "check_causal",
    "check_gradients",
    "check_optimizer_pure",
    "check_padding_invariance",
    "check_state_round_trip",
    "check_transforms_agree",
]


def _other_ids(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Different ids everywhere (when the vocabulary has two or more)."""
    return (ids + 1) % vocab_size


def check_causal(
    apply: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    vocab_size: int,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> None:
    """Outputs at positions ``< t`` do not change when any token from ``t`` on does, for every
    ``t``. ``apply(tokens (B, T)) -> (B, T, ...)``."""
    base = apply(tokens)
    for t in range(1, tokens.shape[-1]):
        edited = tokens.clone()
        edited[..., t:] = _other_ids(tokens[..., t:], vocab_size)
        try:
            torch.testing.assert_close(apply(edited)[:, :t], base[:, :t], rtol=rtol, atol=atol)
        except AssertionError as err:
            raise AssertionError(
                f"not causal: outputs before {t} see tokens from {t} on: {err}"
            ) from None


def check_padding_invariance(
    apply: Callable[[torch.Tensor, torch.Tensor], Any],
    tokens: torch.Tensor,
    valid: torch.Tensor,
    vocab_size: int,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> None:
    """Changing the padded tokens (``valid`` False) changes no output at a real position.
    ``apply(tokens, valid)`` returns ``(B, T, ...)`` outputs, or a tuple or named tuple of them
    (per-sequence outputs, such as BERT's pooled vector, are compared whole)."""
    edited = torch.where(valid, tokens, _other_ids(tokens, vocab_size))
    a, b = apply(tokens, valid), apply(edited, valid)
    for x, y in zip(tree.leaves(a), tree.leaves(b), strict=True):
        per_token = x.shape[:2] == valid.shape
        try:
            want = y[valid] if per_token else y
            torch.testing.assert_close(x[valid] if per_token else x, want, rtol=rtol, atol=atol)
        except AssertionError as err:
            raise AssertionError(f"padding is visible: {err}") from None


def check_batch_independence(
    apply: Callable[..., Any], *inputs: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5
) -> None:
    """Row ``i`` of ``apply(*inputs)`` equals ``apply`` of row ``i`` alone (a batch of one)."""
    whole = apply(*inputs)
    for i in range(inputs[0].shape[0]):
        alone = apply(*(x[i : i + 1] for x in inputs))
        try:
            row = optree.tree_map(lambda y, i=i: y[i : i + 1], whole)
            assert_trees_close(row, alone, rtol=rtol, atol=atol)
        except AssertionError as err:
            raise AssertionError(f"row {i} depends on the other rows: {err}") from None


def check_transforms_agree(
    apply: Callable[..., Any],
    *inputs: torch.Tensor,
    compile: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> None:
    """Eager equals ``torch.func.vmap`` over the rows (each row a batch of one) and, with
    ``compile=True``, ``torch.compile``."""
    eager = apply(*inputs)

    def one_row(*row: torch.Tensor) -> Any:
        return apply(*(x[None] for x in row))

    mapped = optree.tree_map(lambda y: y.squeeze(1), torch.func.vmap(one_row)(*inputs))
    assert_trees_close(mapped, eager, rtol=rtol, atol=atol)
    if compile:
        assert_trees_close(torch.compile(apply)(*inputs), eager, rtol=rtol, atol=atol)


def check_gradients(
    loss: Callable[[Any], torch.Tensor],
    params: Any,
    key: torch.Tensor,
    *,
    directions: int = 3,
    eps: float = 1e-6,
    rtol: float = 1e-5,
    atol: float = 1e-8,
) -> None:
    """Autograd's gradient of ``loss(params)`` against float64 central differences along
    ``directions`` random directions: ``(L(p + e v) - L(p - e v)) / 2e = <grad L, v>``.
    Params are cast to float64 first (so the model must accept float64 params)."""
    p64 = tree.map(lambda x: x.double() if x.is_floating_point() else x, params)
    (_, _), grads = value_and_grad(lambda p: (loss(p), {}))(p64)
    leaves, spec = optree.tree_flatten(p64)
    grad_leaves = optree.tree_leaves(grads, none_is_leaf=True)  # None where not floating
    n_floating = sum(x.is_floating_point() for x in leaves)
    for d, k in enumerate(random.split(key, directions)):
        draws = iter(random.split(k, n_floating))
        v = [random.normal(next(draws), x.shape, dtype=torch.float64)
             if x.is_floating_point() else None for x in leaves]  # fmt: skip

        def moved(step: float, v: list = v) -> Any:
            return optree.tree_unflatten(
                spec, [x if u is None else x + step * u for x, u in zip(leaves, v, strict=True)]
            )

        numeric = float((loss(moved(eps)) - loss(moved(-eps))) / (2 * eps))
        pairs = zip(grad_leaves, v, strict=True)
        analytic = float(sum((g * u).sum() for g, u in pairs if u is not None))
        if abs(numeric - analytic) > atol + rtol * abs(numeric):
            raise AssertionError(f"direction {d}: finite differences give {numeric!r}, the "
                                 f"gradient {analytic!r}")  # fmt: skip


def check_optimizer_pure(optimizer: Any, params: Any, grads: Any) -> None:
    """``init`` and ``update`` modify none of their inputs, and the same inputs give the same
    outputs twice (no hidden state, no global RNG)."""
    before = tree.map(lambda x: x.clone(), (params, grads))
    state = optimizer.init(params)
    state_before = tree.map(lambda x: x.clone(), state)
    first = optimizer.update(grads, state, params)
    second = optimizer.update(grads, state, params)
    assert_trees_equal((params, grads), before)
    assert_trees_equal(state, state_before)
    assert_trees_equal(first, second)


def check_state_round_trip(
    optimizer: Any, params: Any, grads: Any, directory: str | os.PathLike
) -> None:
    """An optimizer state saved with :func:`functional_llm.checkpoint.save` after one update
    loads back (``like=`` a fresh state) and gives the same next update, bit for bit."""
    from functional_llm import checkpoint

    _, state = optimizer.update(grads, optimizer.init(params), params)
    path = Path(directory) / "optimizer_state.safetensors"
    checkpoint.save(path, state)
    loaded = checkpoint.load(path, like=optimizer.init(params))
    assert_trees_equal(loaded, state)
    assert_trees_equal(
        optimizer.update(grads, loaded, params), optimizer.update(grads, state, params)
    )
