"""Clipping and numerical guards, without host synchronisation (every decision is a
``torch.where`` on device, so a compiled step never waits for the CPU to read a flag)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functional_llm.optim import _foreach as ops
from functional_llm.optim.base import (
    GradientTransformation,
    PyTree,
    first_device,
    flat,
    stateless,
    step_if,
    unflat,
)

__all__ = [
    "ApplyIfFiniteState",
    "ZeroNansState",
    "apply_if_finite",
    "clip",
    "clip_by_global_norm",
    "clip_factor",
    "global_norm",
    "zero_nans",
]


def global_norm(tree: PyTree) -> torch.Tensor:
    """``sqrt(sum of squares of every element)`` over the tree's leaves (holes skipped)."""
    leaves, _ = flat(tree)
    if not leaves:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(ops.norms(leaves)))


def clip_factor(norm: torch.Tensor, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """``min(1, max_norm / (norm + eps))``: what scales a gradient of global norm ``norm``
    to at most ``max_norm`` (``torch.nn.utils.clip_grad_norm_``'s rule, with its ``1e-6``)."""
    return (max_norm / (norm + eps)).clamp(max=1.0)


def clip(max_delta: float) -> GradientTransformation:
    """Clamp each element of the updates to ``[-max_delta, max_delta]``."""
    return stateless(lambda g, p: ops.clamp(g, -max_delta, max_delta))


def clip_by_global_norm(max_norm: float, eps: float = 1e-6) -> GradientTransformation:
    """Scale all updates by ``min(1, max_norm / (||g|| + eps))``; the norm is over the leaves
    this transform sees.

    The default ``eps=1e-6`` is ``torch.nn.utils.clip_grad_norm_``'s, so a gradient whose norm
    is exactly ``max_norm`` still shrinks by a factor ``1 - 1e-6 / max_norm``. ``eps=0`` is
    Optax's ``clip_by_global_norm``: ``g`` unchanged while ``||g|| < max_norm``, else
    ``g max_norm / ||g||``."""

    def rescale(g: list[torch.Tensor], p: list[torch.Tensor]) -> list[torch.Tensor]:
        norm = torch.linalg.vector_norm(torch.stack(ops.norms(g)))
        return ops.mul(g, clip_factor(norm, max_norm, eps).to(g[0].dtype))

    return stateless(rescale)


class ZeroNansState(NamedTuple):
    found_nan: torch.Tensor  # True if this step's updates held a NaN


def zero_nans() -> GradientTransformation:
    """Replace NaNs in the updates with 0; the state records whether there were any."""

    def init(params: PyTree) -> ZeroNansState:
        return ZeroNansState(torch.zeros((), dtype=torch.bool, device=first_device(params)))

    def update(
        updates: PyTree, state: ZeroNansState, params: PyTree | None = None, **_: Any
    ) -> tuple:
        g, spec = flat(updates)
        if not g:
            return updates, state
        found = torch.stack([torch.isnan(x).any() for x in g]).any()
        cleaned = [torch.where(torch.isnan(x), torch.zeros_like(x), x) for x in g]
        return unflat(spec, cleaned), ZeroNansState(found)

    return GradientTransformation(init, update)


class ApplyIfFiniteState(NamedTuple):
    notfinite_count: torch.Tensor  # consecutive non-finite steps so far
    last_finite: torch.Tensor  # whether the last step's updates were finite
    total_notfinite: torch.Tensor  # skipped steps in all
    inner_state: PyTree


def apply_if_finite(
    inner: GradientTransformation, max_consecutive_errors: int = 2**31 - 1
) -> GradientTransformation:
    """Run ``inner`` but skip a step whose updates hold an inf or NaN: zero updates, the inner
    state unchanged, the skip counted. After ``max_consecutive_errors`` skips in a row the
    update goes through anyway (so a permanently broken run does not stall silently)."""

    def init(params: PyTree) -> ApplyIfFiniteState:
        zero = lambda: torch.zeros((), dtype=torch.int32)  # noqa: E731  (no aliasing: each its own tensor)
        return ApplyIfFiniteState(
            zero(), torch.ones((), dtype=torch.bool), zero(), inner.init(params)
        )

    def update(
        updates: PyTree, state: ApplyIfFiniteState, params: PyTree | None = None, **extra: Any
    ) -> tuple:
        g, _ = flat(updates)
        finite = (
            torch.stack([torch.isfinite(x).all() for x in g]).all()
            if g
            else torch.ones((), dtype=torch.bool)
        )
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra)
        notfinite_count = torch.where(finite, 0, state.notfinite_count + 1)
        apply = finite | (notfinite_count > max_consecutive_errors)
        out, inner_state = step_if(apply, new_updates, new_inner, state.inner_state)
        total = state.total_notfinite + (~finite).to(torch.int32)
        return out, ApplyIfFiniteState(notfinite_count.to(torch.int32), finite, total, inner_state)

    return GradientTransformation(init, update)
