"""The optimizer protocol: stateless gradient transformations, as in Optax.

A :class:`GradientTransformation` is a pair of pure functions::

    state = opt.init(params)
    updates, state = opt.update(grads, state, params, **extra)   # extra: e.g. loss=...
    params = apply_updates(params, updates)                      # params + updates

Nothing is mutated: states are pytrees (NamedTuples of tensors and trees of tensors) that
can be saved, sharded, vmapped and compiled. ``None`` in a tree is a hole (a leaf some
combinator masked out); every transform skips holes.

Transforms work on the flattened leaves with ``torch._foreach_*`` kernels (one launch per
operation for all leaves, as ``torch.optim``'s ``foreach`` path), keep one step counter per
state, and never synchronise with the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import optree
import torch

from functional_llm import tree

__all__ = [
    "EmptyState",
    "GradientTransformation",
    "Schedule",
    "apply_updates",
    "chain",
    "identity",
    "set_to_zero",
]

PyTree = Any
Schedule = Callable[[torch.Tensor], torch.Tensor]
ScalarOrSchedule = float | torch.Tensor | Schedule
MaskOrFn = PyTree | Callable[[PyTree], PyTree]


class InitFn(Protocol):
    def __call__(self, params: PyTree) -> PyTree: ...


class UpdateFn(Protocol):
    def __call__(
        self, updates: PyTree, state: PyTree, params: PyTree | None = None, **extra: Any
    ) -> tuple[PyTree, PyTree]: ...


class GradientTransformation(NamedTuple):
    """``init(params) -> state`` and ``update(updates, state, params=None, **extra)``."""

    init: InitFn
    update: UpdateFn


class EmptyState(NamedTuple):
    """The state of a stateless transformation."""


def flat(tree: PyTree) -> tuple[list[torch.Tensor], optree.PyTreeSpec]:
    """Leaves (holes skipped) and the structure to put them back."""
    return optree.tree_flatten(tree)


def unflat(
    spec: optree.PyTreeSpec, leaves: list[torch.Tensor] | tuple[torch.Tensor, ...]
) -> PyTree:
    return optree.tree_unflatten(spec, list(leaves))


def zeros_like(tree: PyTree) -> PyTree:
    return optree.tree_map(torch.zeros_like, tree)


def step_if(
    take: torch.Tensor, new_updates: PyTree, new_state: PyTree, old_state: PyTree
) -> tuple[PyTree, PyTree]:
    """``(new_updates, new_state)`` where the boolean ``take`` holds, else zero updates and
    ``old_state``: a step taken or skipped on device, with no host synchronisation."""
    updates = optree.tree_map(lambda u: torch.where(take, u, torch.zeros_like(u)), new_updates)
    return updates, optree.tree_map(lambda n, o: torch.where(take, n, o), new_state, old_state)


def counter(device: torch.device | None = None) -> torch.Tensor:
    """A state's step counter: an int32 scalar, so a compiled step never specialises on it."""
    return torch.zeros((), dtype=torch.int32, device=device)


def first_device(tree: PyTree) -> torch.device | None:
    leaves = optree.tree_leaves(tree)
    return leaves[0].device if leaves else None


def _signature(params: PyTree) -> tuple:
    """Everything a mask function can read of a tree without reading values: its paths, and
    each leaf's type, shape and dtype (what an Optax mask sees under ``jit``)."""
    described = tuple(
        (type(x), tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else (type(x), x)
        for x in optree.tree_leaves(params)
    )
    return tuple(tree.paths(params)), described


def per_structure(mask_or_fn: MaskOrFn) -> Callable[[PyTree], PyTree]:
    """The mask (or labels) of a params tree: ``mask_or_fn(params)`` when it is a function.

    The result is memoised, keyed on everything such a function may read (paths, and each
    leaf's type, shape and dtype, but not values), so the memo never changes a result:
    the same function on another tree, even one with the same paths, is called afresh. ``init``
    (run eagerly) fills the memo, and a ``torch.compile``d ``update`` then reads a constant
    instead of tracing the user's path-matching code.
    """
    if not callable(mask_or_fn):
        return lambda params: mask_or_fn
    memo: dict[tuple, PyTree] = {}

    def resolve(params: PyTree) -> PyTree:
        key = _signature(params)
        if key not in memo:
            memo[key] = mask_or_fn(params)
        return memo[key]

    return resolve


def apply_updates(params: PyTree, updates: PyTree, *, donate: bool = False) -> PyTree:
    """``params + updates`` leaf by leaf, in the params' dtype; holes in ``updates`` leave the
    param unchanged. ``donate=True``: ``params`` is consumed and the sums are written into its
    buffers (no fresh params-sized allocations); the default leaves it untouched."""
    p, spec = flat(params)
    u = spec.flatten_up_to(updates)
    present = [i for i, x in enumerate(u) if x is not None]
    if not present:
        return params
    targets = [p[i] for i in present]
    deltas = [u[i].to(p[i].dtype) for i in present]
    if donate:
        torch._foreach_add_(targets, deltas)
        return params
    new = list(p)
    for i, x in zip(present, torch._foreach_add(targets, deltas), strict=True):
        new[i] = x
    return unflat(spec, new)


def identity() -> GradientTransformation:
    """Leaves updates as they are."""
    return GradientTransformation(lambda params: EmptyState(), lambda u, s, p=None, **_: (u, s))


def set_to_zero() -> GradientTransformation:
    """Zero updates: the transform for frozen parameters in :func:`multi_transform`."""
    return GradientTransformation(
        lambda params: EmptyState(),
        lambda u, s, p=None, **_: (zeros_like(u), s),
    )


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order; the state is the tuple of their states."""

    def init(params: PyTree) -> tuple:
        return tuple(t.init(params) for t in transforms)

    def update(
        updates: PyTree, state: tuple, params: PyTree | None = None, **extra: Any
    ) -> tuple[PyTree, tuple]:
        if len(state) != len(transforms):
            raise ValueError(f"chain of {len(transforms)} transforms got a state of {len(state)}")
        new_states = []
        for t, s in zip(transforms, state, strict=True):
            updates, s = t.update(updates, s, params, **extra)
            new_states.append(s)
        return updates, tuple(new_states)

    return GradientTransformation(init, update)


def as_schedule(value: ScalarOrSchedule) -> Schedule:
    """A constant or a schedule, as a function of the step tensor."""
    return value if callable(value) else (lambda count: torch.as_tensor(value))
