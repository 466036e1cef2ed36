"""Combinators: apply transforms to parts of the tree, accumulate gradients, and keep
hyperparameters in the state.

* :func:`masked` runs a transform on the leaves a mask selects; the others pass through.
* :func:`multi_transform` runs one transform per label (e.g. ``"decay"``, ``"no_decay"``,
  ``"frozen"``); each sees only its own leaves, so a clipping norm excludes frozen ones.
* :func:`multi_steps` (``MultiSteps``) accumulates ``k`` micro-batch gradients.
* :func:`inject_hyperparams` puts learning rate and friends in the state as tensors.
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import optree
import torch

from functional_llm import tree
from functional_llm.optim import _foreach as ops
from functional_llm.optim.base import (
    GradientTransformation,
    MaskOrFn,
    PyTree,
    counter,
    first_device,
    flat,
    per_structure,
    step_if,
    unflat,
    up_to,
    update_and_apply,
    zeros_like,
)

__all__ = [
    "InjectHyperparamsState",
    "MultiSteps",
    "MultiStepsState",
    "hyperparams",
    "inject_hyperparams",
    "labels_by_path",
    "masked",
    "multi_steps",
    "multi_transform",
]


def masked(inner: GradientTransformation, mask: MaskOrFn) -> GradientTransformation:
    """Apply ``inner`` where ``mask`` (a bool tree, or a function of params giving one) is True;
    other updates pass through unchanged.

    ``inner`` sees the selected leaves as a flat ``{dotted path: leaf}`` dict, and its state
    holds only those leaves. (A flat dict rather than the tree with ``None`` holes: dynamo
    cannot flatten a nested dict whose entries are all holes, so this keeps masked optimizers
    compilable inside a whole train step.)"""

    resolve = per_structure(mask)
    chosen_paths = per_structure(
        lambda params: frozenset(p for p, keep in tree.flatten(resolve(params)).items() if keep)
    )

    def select(t: PyTree, paths: frozenset) -> dict[str, Any]:
        return {p: x for p, x in tree.flatten(t).items() if p in paths}

    def init(params: PyTree) -> PyTree:
        return inner.init(select(params, chosen_paths(params)))

    def update(updates: PyTree, state: PyTree, params: PyTree | None = None, **extra: Any) -> tuple:
        paths = chosen_paths(params if params is not None else updates)
        chosen = select(updates, paths)
        chosen_params = None if params is None else select(params, paths)
        new, state = inner.update(chosen, state, chosen_params, **extra)
        merged = tree.map_with_path(lambda p, x: new[p] if p in paths else x, updates)
        return merged, state

    return GradientTransformation(init, update)


def labels_by_path(rules: Mapping[tree.Pattern, str], default: str) -> Callable[[PyTree], PyTree]:
    """A labelling function for :func:`multi_transform`: each leaf gets the label of the first
    glob pattern its dotted path matches (``{"*norm*": "no_decay", "*.b": "no_decay"}``)."""

    compiled = [(tree.compile_pattern(pattern), lab) for pattern, lab in rules.items()]

    def label(params: PyTree) -> PyTree:
        def pick(path: str, _: Any) -> str:
            return next((lab for pattern, lab in compiled if pattern.search(path)), default)

        return tree.map_with_path(pick, params)

    return label


def multi_transform(
    transforms: Mapping[str, GradientTransformation], labels: MaskOrFn
) -> GradientTransformation:
    """One transform per label; ``labels`` is a tree of label strings over params (or a function
    of params giving one, e.g. :func:`labels_by_path`). Use :func:`set_to_zero` to freeze."""

    resolve = per_structure(labels)

    def compute_masks(params: PyTree) -> dict[str, PyTree]:
        labelled = resolve(params)
        unknown = set(tree.leaves(labelled)) - set(transforms)
        if unknown:
            raise ValueError(
                f"labels {sorted(unknown)} have no transform; known: {sorted(transforms)}"
            )
        return {
            name: optree.tree_map(functools.partial(operator.eq, name), labelled)
            for name in transforms
        }

    masks = per_structure(compute_masks)
    parts = {
        name: masked(t, lambda params, name=name: masks(params)[name])
        for name, t in transforms.items()
    }

    def init(params: PyTree) -> dict[str, PyTree]:
        return {name: part.init(params) for name, part in parts.items()}

    def update(
        updates: PyTree, state: dict[str, PyTree], params: PyTree | None = None, **extra: Any
    ) -> tuple:
        new_state = {}
        for name, part in parts.items():
            updates, new_state[name] = part.update(updates, state[name], params, **extra)
        return updates, new_state

    return GradientTransformation(init, update)


class MultiStepsState(NamedTuple):
    mini_step: torch.Tensor  # micro-steps accumulated since the last real update
    acc_grads: PyTree  # running mean of those micro-batch gradients
    inner_state: PyTree


def multi_steps(inner: GradientTransformation, every_k: int) -> GradientTransformation:
    """Gradient accumulation: ``every_k`` calls give zero updates but for the last, which
    applies ``inner`` to the mean gradient. One params-sized buffer holds the running mean
    ``a_j = a_{j-1} + (g_j - a_{j-1}) / j``, so no separate sum is kept.

    Without host synchronisation the choice is made with ``torch.where``: ``inner`` is
    evaluated every micro-step and its result kept only on the k-th (cheap next to the
    forward and backward passes that produced the gradient).
    """
    if every_k < 1:
        raise ValueError(f"multi_steps needs every_k >= 1, got {every_k}")

    def init(params: PyTree) -> MultiStepsState:
        return MultiStepsState(
            counter(first_device(params)), zeros_like(params), inner.init(params)
        )

    def update(
        updates: PyTree, state: MultiStepsState, params: PyTree | None = None, **extra: Any
    ) -> tuple:
        g, spec = flat(updates)
        j = state.mini_step + 1
        acc = up_to(spec, state.acc_grads)
        mean = ops.add(acc, ops.div(ops.sub(g, acc), j.to(g[0].dtype)))
        new_updates, new_inner = inner.update(
            unflat(spec, mean), state.inner_state, params, **extra
        )
        emit = j >= every_k
        out, inner_state = step_if(emit, new_updates, new_inner, state.inner_state)
        acc_next = unflat(spec, [torch.where(emit, torch.zeros_like(m), m) for m in mean])
        return out, MultiStepsState(torch.where(emit, 0, j).to(torch.int32), acc_next, inner_state)

    return GradientTransformation(init, update)


MultiSteps = multi_steps  # Optax's name for it


class InjectHyperparamsState(NamedTuple):
    count: torch.Tensor
    hyperparams: dict[str, torch.Tensor]  # current values: read them, or overwrite to override
    inner_state: PyTree


def inject_hyperparams(
    factory: Callable[..., GradientTransformation], static_args: tuple[str, ...] = ("mask",)
) -> Callable[..., GradientTransformation]:
    """Wrap an optimizer factory so its numeric hyperparameters live in the state as tensors.

    ``opt = inject_hyperparams(adamw)(learning_rate=warmup_cosine(...), weight_decay=0.1)``;
    each step evaluates schedules at the state's step count and stores the values in
    ``state.hyperparams``. Replace a value there (``state._replace(hyperparams={...,
    "learning_rate": torch.tensor(1e-4)})``) to override it at run time; a constant
    hyperparameter keeps the value found in the state, so an override persists. Values are
    tensors, so a compiled step never recompiles when they change. :func:`hyperparams` reads
    them from any optimizer state that holds one (what a train step reports). The wrapped
    optimizer's ``update_in_place`` is kept.

    Injected: float and tensor arguments, and callables (schedules) not named in
    ``static_args``; ints, bools, strings and the ``static_args`` are passed as given.
    """
    signature = inspect.signature(factory)

    def wrapped(*args: Any, **kwargs: Any) -> GradientTransformation:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        numeric = {
            k: v
            for k, v in bound.arguments.items()
            if k not in static_args and (callable(v) or isinstance(v, float | torch.Tensor))
        }
        schedules = {k: v for k, v in numeric.items() if callable(v)}
        static = {  # masks resolved once per tree, not each time the factory is called
            k: per_structure(v) if k in static_args and callable(v) else v
            for k, v in bound.arguments.items()
            if k not in numeric
        }

        def values(
            count: torch.Tensor, current: dict[str, torch.Tensor] | None
        ) -> dict[str, torch.Tensor]:
            out = {}
            for k, v in numeric.items():
                if k in schedules:
                    out[k] = torch.as_tensor(schedules[k](count), dtype=torch.float32)
                else:
                    out[k] = (
                        current[k]
                        if current is not None
                        else torch.as_tensor(v, dtype=torch.float32)
                    )
            return out

        def init(params: PyTree) -> InjectHyperparamsState:
            count = counter(first_device(params))
            hyper = values(count, None)
            return InjectHyperparamsState(count, hyper, factory(**static, **hyper).init(params))

        def update(
            updates: PyTree,
            state: InjectHyperparamsState,
            params: PyTree | None = None,
            **extra: Any,
        ) -> tuple:
            hyper = values(state.count, state.hyperparams)
            updates, inner = factory(**static, **hyper).update(
                updates, state.inner_state, params, **extra
            )
            return updates, InjectHyperparamsState(state.count + 1, hyper, inner)

        def update_in_place(params: PyTree, grads: PyTree, state: InjectHyperparamsState) -> tuple:
            hyper = values(state.count, state.hyperparams)
            params, inner = update_and_apply(
                factory(**static, **hyper), params, grads, state.inner_state, donate=True
            )
            return params, InjectHyperparamsState(state.count + 1, hyper, inner)

        return GradientTransformation(init, update, update_in_place)

    return wrapped


def hyperparams(state: PyTree) -> dict[str, torch.Tensor]:
    """The injected hyperparameters of the first :func:`inject_hyperparams` state found in an
    optimizer state (the values its last step used), or ``{}`` where there is none."""
    found = optree.tree_leaves(state, is_leaf=lambda x: isinstance(x, InjectHyperparamsState))
    return next((dict(x.hyperparams) for x in found if isinstance(x, InjectHyperparamsState)), {})
