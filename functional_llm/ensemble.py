"""Ensembles and sweeps as one step: N members of one structure, stacked on a leading axis and
trained by one ``vmap`` of the ordinary train step.

    states = ensemble.init_states(model.init, opt, random.split(random.key(0), 8))
    states = ensemble.set_hyperparams(states, learning_rate=torch.logspace(-4, -2, 8))
    step = ensemble.make_step(train.make_step(loss_fn, opt, grad_method="func"))
    states, metrics = step(states, batch)      # metrics["loss"]: (8,), one per member

Member ``i`` is exactly the run it would be alone: its own params, optimizer state, step count
and dropout keys (``fold_in`` of its own key), and its own injected hyperparameters
(:func:`~functional_llm.optim.inject_hyperparams` keeps them as tensors in the state, so a
batched value gives each member its own). The batch is shared (``shared_batch=True``) or one
per member along the leading axis. A stacked state is a pytree: it checkpoints, compiles
(``train.compile(step)``: one graph for all members) and indexes like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch

from functional_llm import random, tree
from functional_llm.optim.base import GradientTransformation
from functional_llm.optim.combinators import InjectHyperparamsState, hyperparams
from functional_llm.train import TrainState, init_state
from functional_llm.types import Batch, Metrics, PyTree

__all__ = ["index", "init_states", "make_step", "members", "set_hyperparams", "stack", "unstack"]


def stack(trees: Sequence[PyTree]) -> PyTree:
    """One tree whose every leaf is the members' leaves stacked on a new leading axis. Members
    must match in structure, shapes and dtypes; a mismatch names the member and the path."""
    if not trees:
        raise ValueError("ensemble.stack: no members")
    first = tree.flatten(trees[0])
    for i, member in enumerate(trees[1:], start=1):
        leaves = tree.flatten(member)
        if leaves.keys() != first.keys():
            missing, extra = sorted(first.keys() - leaves.keys()), sorted(leaves.keys() - first)
            raise ValueError(
                f"ensemble.stack: member {i} differs from member 0 in structure: "
                f"missing {missing}, extra {extra}"
            )
        for path, leaf in leaves.items():
            a, b = first[path], leaf
            if (a.shape, a.dtype) != (b.shape, b.dtype):
                raise ValueError(
                    f"ensemble.stack: member {i}'s {path} is {tuple(b.shape)} {b.dtype}, member "
                    f"0's is {tuple(a.shape)} {a.dtype}"
                )
    return optree.tree_map(lambda *xs: torch.stack(xs), *trees)


def members(stacked: PyTree) -> int:
    """The number of members: the leading size, which every leaf must share."""
    sizes = {
        path: leaf.shape[0] if leaf.ndim else None for path, leaf in tree.flatten(stacked).items()
    }
    distinct = set(sizes.values())
    if len(distinct) != 1 or None in distinct:
        raise ValueError(f"not a stacked ensemble: leading sizes by path {sizes}")
    return distinct.pop()  # type: ignore[return-value]


def index(stacked: PyTree, i: int) -> PyTree:
    """Member ``i`` (a view of the stacked leaves)."""
    n = members(stacked)
    if not -n <= i < n:
        raise IndexError(f"member {i} of an ensemble of {n}")
    return optree.tree_map(lambda x: x[i], stacked)


def unstack(stacked: PyTree) -> list[PyTree]:
    """The members as separate trees."""
    return [index(stacked, i) for i in range(members(stacked))]


def init_states(
    init: Callable[[torch.Tensor], PyTree], optimizer: GradientTransformation, keys: torch.Tensor
) -> TrainState:
    """A stacked :class:`TrainState` of ``len(keys)`` members: member ``i``'s params are
    ``init(k)`` and its run key ``k'``, where ``k, k' = split(keys[i])`` (see
    :func:`functional_llm.random.split`), exactly as a lone run from ``keys[i]`` would start."""
    states = []
    for key in keys:
        k_init, k_run = random.split(key)
        states.append(init_state(init(k_init), optimizer, k_run))
    return stack(states)


def set_hyperparams(state: TrainState, **values: Any) -> TrainState:
    """``state`` with injected hyperparameters replaced per member: each value is a sequence or
    1-D tensor with one entry per member (or a scalar, the same for all). The optimizer must
    inject them (:func:`~functional_llm.optim.inject_hyperparams`); a schedule recomputes its
    value every step, so only constant hyperparameters can be set this way."""
    n = members(state)
    if not hyperparams(state.opt_state):
        raise ValueError("set_hyperparams: the optimizer state injects no hyperparameters; "
                         "build the optimizer with optim.inject_hyperparams(...)")  # fmt: skip

    def replace(node: Any) -> Any:
        if not isinstance(node, InjectHyperparamsState):
            return node
        unknown = sorted(set(values) - set(node.hyperparams))
        if unknown:
            injected = sorted(node.hyperparams)
            raise KeyError(f"set_hyperparams: {unknown} are not injected (injected: {injected})")
        new = dict(node.hyperparams)
        for name, value in values.items():
            v = torch.as_tensor(value, dtype=torch.float32, device=node.count.device)
            v = v.expand(n).clone() if v.ndim == 0 else v
            if v.shape != (n,):
                raise ValueError(
                    f"set_hyperparams: {name} has {tuple(v.shape)} values for {n} members"
                )
            new[name] = v
        return node._replace(hyperparams=new)

    is_leaf = lambda x: isinstance(x, InjectHyperparamsState)  # noqa: E731
    opt_state = optree.tree_map(replace, state.opt_state, is_leaf=is_leaf, none_is_leaf=True)
    return state._replace(opt_state=opt_state)


def make_step(
    step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]], *, shared_batch: bool = True
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The members' step: ``vmap`` of ``step`` (built with ``grad_method="func"``: only
    ``torch.func``'s gradient batches) over the stacked state, with the batch shared or one per
    member (``shared_batch=False``: every batch entry has a leading member axis)."""
    return torch.func.vmap(step, in_dims=(0, None if shared_batch else 0), randomness="error")
