"""The optimizer protocol: stateless gradient transformations, as in Optax.

A :class:`GradientTransformation` is a pair of pure functions::

    state = opt.init(params)
    updates, state = opt.update(grads, state, params, **extra)   # extra: e.g. loss=...
    params = apply_updates(params, updates)                      # params + updates

An optimizer may also offer ``update_in_place(params, grads, state) -> (params, state)``, the
same step written into the buffers of ``params`` and ``state`` (for AdamW, the fused kernel of
``torch.optim``): :func:`update_and_apply` uses it where it exists, in the caller's buffers
with ``donate=True`` and on copies it owns without, so a train step has one code path for
every optimizer.

Nothing is mutated: states are pytrees (NamedTuples of tensors and trees of tensors) that
can be saved, sharded, vmapped and compiled. ``None`` in a tree is a hole (a leaf some
combinator masked out); every transform skips holes.

Transforms work on the flattened leaves with the list arithmetic of :mod:`._foreach` (one
kernel launch per operation for all leaves, as ``torch.optim``'s ``foreach`` path), keep one
step counter per state, and never synchronise with the host. :func:`stateless` makes a
transform without state from a function of the leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, cast

import optree
import torch

from functional_llm import tree
from functional_llm.optim import _foreach
from functional_llm.types import PyTree

__all__ = [
    "EmptyState",
    "GradientTransformation",
    "Schedule",
    "apply_updates",
    "chain",
    "check_grads",
    "identity",
    "set_to_zero",
    "stateless",
    "update_and_apply",
]

Schedule = Callable[[torch.Tensor], torch.Tensor]
ScalarOrSchedule = float | torch.Tensor | Schedule
MaskOrFn = PyTree | Callable[[PyTree], PyTree]


class InitFn(Protocol):
    def __call__(self, params: PyTree) -> PyTree: ...


class UpdateFn(Protocol):
    def __call__(
        self, updates: PyTree, state: PyTree, params: PyTree | None = None, **extra: Any
    ) -> tuple[PyTree, PyTree]: ...


class InPlaceFn(Protocol):
    def __call__(self, params: PyTree, grads: PyTree, state: PyTree) -> tuple[PyTree, PyTree]: ...


class GradientTransformation(NamedTuple):
    """``init(params) -> state`` and ``update(updates, state, params=None, **extra)``; optionally
    ``update_in_place(params, grads, state) -> (params, state)``, which consumes ``params`` and
    ``state`` and writes the step's result into their buffers."""

    init: InitFn
    update: UpdateFn
    update_in_place: InPlaceFn | None = None


class EmptyState(NamedTuple):
    """The state of a stateless transformation."""


def flat(tree: PyTree) -> tuple[list[torch.Tensor], optree.PyTreeSpec]:
    """Leaves (holes skipped) and the structure to put them back."""
    return optree.tree_flatten(tree)


def unflat(spec: optree.PyTreeSpec, leaves: Sequence[Any]) -> PyTree:
    return optree.tree_unflatten(spec, list(leaves))


def up_to(spec: optree.PyTreeSpec, tree: PyTree) -> list[torch.Tensor]:
    """``tree``'s subtrees at ``spec``'s leaves (tensors, where ``tree`` mirrors ``spec``'s
    tree: a state's moments, the gradients of params)."""
    return cast(list[torch.Tensor], spec.flatten_up_to(tree))


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
    buffers (no fresh params-sized allocations); the default leaves it untouched. Updates
    must have the params' structure and shapes (:func:`check_grads`); their dtype may differ."""
    check_grads(params, updates, dtypes=False, what="update")
    return _add(params, updates, donate)


def _add(params: PyTree, updates: PyTree, donate: bool) -> PyTree:
    p, spec = flat(params)
    u = up_to(spec, updates)
    present = [i for i, x in enumerate(u) if x is not None]
    if not present:
        return params
    targets = [p[i] for i in present]
    deltas = [u[i].to(p[i].dtype) for i in present]
    if donate:
        _foreach.add_(targets, deltas)
        return params
    new = list(p)
    for i, x in zip(present, _foreach.add(targets, deltas), strict=True):
        new[i] = x
    return unflat(spec, new)


def update_and_apply(
    optimizer: GradientTransformation,
    params: PyTree,
    grads: PyTree,
    state: PyTree,
    *,
    donate: bool = False,
) -> tuple[PyTree, PyTree]:
    """One optimizer step: ``(new params, new state)``.

    ``donate=True``: ``params`` and ``state`` are consumed (do not read them again); the
    optimizer's ``update_in_place`` runs where it has one, and otherwise the updates are added
    into the params' buffers.

    ``donate=False``: pure, ``params`` and ``state`` are left as they were. Eagerly, on plain
    tensors, an optimizer with ``update_in_place`` runs it on copies of them that this step
    owns, so the pure step gets the fused kernel too and the same bits as a donated one (and
    makes three params-sized tensors, where the chain of ``update`` makes four and more
    passes). Under ``torch.compile``, ``vmap`` or ``grad``, on DTensors or on tensors that
    require grad it runs ``update`` and adds the updates, which the compiler fuses."""
    check_grads(params, grads)
    if optimizer.update_in_place is not None:
        if donate:
            return optimizer.update_in_place(params, grads, state)
        if _plain_eager(params, grads):
            copy = lambda x: x.clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
            return optimizer.update_in_place(tree.map(copy, params), grads, tree.map(copy, state))
    updates, state = optimizer.update(grads, state, params)
    return _add(params, updates, donate), state


def _plain_eager(*trees: PyTree) -> bool:
    """Eager, and every leaf a plain floating tensor on the CPU or a GPU, outside autograd and
    torch.func's transforms: what a fused in-place kernel may run on."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return all(
        type(x) is torch.Tensor
        and x.is_floating_point()
        and x.device.type in ("cpu", "cuda")
        and not x.requires_grad
        for x in tree.leaves(trees)
    )


def check_grads(
    params: PyTree, grads: PyTree, *, dtypes: bool = True, what: str = "gradient"
) -> None:
    """``grads`` must mirror ``params``: the same structure (a ``None`` hole allowed where no
    gradient flows) and, leaf by leaf, the same shape and dtype; otherwise a ``ValueError``
    naming the path. A (1, 32) gradient for a (65, 32) param would otherwise broadcast.
    Shapes are static, so nothing is checked while compiling (the graph fixes them)."""
    if torch.compiler.is_compiling():
        return
    p, spec = flat(params)
    try:
        g = up_to(spec, grads)
    except ValueError:
        wanted, got = set(tree.paths(params)), set(tree.paths(grads))
        missing, extra = sorted(wanted - got)[:5], sorted(got - wanted)[:5]
        raise ValueError(
            f"the {what}s do not have the params' structure: missing {missing}, unexpected {extra}"
        ) from None
    for i, (x, dx) in enumerate(zip(p, g, strict=True)):
        if dx is not None and (dx.shape != x.shape or (dtypes and dx.dtype != x.dtype)):
            path = tree.paths(params)[i]
            raise ValueError(
                f"the {what} of {path} is {tuple(dx.shape)} {dx.dtype}, but the param is "
                f"{tuple(x.shape)} {x.dtype}"
            )


def stateless(
    fn: Callable[[list[torch.Tensor], list[torch.Tensor]], list[torch.Tensor]],
    *,
    needs_params: str | None = None,
) -> GradientTransformation:
    """A transformation without state from ``fn(update_leaves, param_leaves) -> new leaves``
    (holes skipped; ``param_leaves`` is empty when no params were given). ``needs_params``, the
    transform's name, makes a call without params an error that names it."""

    def update(updates: PyTree, state: EmptyState, params: PyTree | None = None, **_: Any) -> tuple:
        if needs_params and params is None:
            raise ValueError(f"{needs_params} needs params: call update(grads, state, params)")
        g, spec = flat(updates)
        if not g:
            return updates, state
        p = [] if params is None else up_to(spec, params)
        return unflat(spec, fn(g, p)), state

    return GradientTransformation(lambda params: EmptyState(), update)


def identity() -> GradientTransformation:
    """Leaves updates as they are."""

    def update(updates: PyTree, state: EmptyState, params: PyTree | None = None, **_: Any) -> tuple:
        return updates, state

    return GradientTransformation(lambda params: EmptyState(), update)


def set_to_zero() -> GradientTransformation:
    """Zero updates: the transform for frozen parameters in :func:`multi_transform`."""
    return stateless(lambda g, p: [torch.zeros_like(x) for x in g])


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
