"""Gradient transformations: scaling, moments, momentum and weight decay.

Each is a :class:`~functional_llm.optim.GradientTransformation`; optimizers are chains of
them (see :mod:`functional_llm.optim.alias`). ``g`` is the incoming update (the gradient at
the start of a chain), ``t`` the state's step counter after this step (1 on the first step).

Hyperparameters may be Python numbers or 0-dim tensors (what :func:`inject_hyperparams`
passes), so the same code serves fixed and run-time-adjustable optimizers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functional_llm.optim.base import (
    EmptyState,
    GradientTransformation,
    MaskOrFn,
    PyTree,
    ScalarOrSchedule,
    Schedule,
    counter,
    first_device,
    flat,
    unflat,
    zeros_like,
)
from functional_llm.optim.combinators import masked

__all__ = [
    "ScaleByAdamState",
    "ScaleByLionState",
    "ScaleByRmsState",
    "ScaleByRssState",
    "ScaleByScheduleState",
    "TraceState",
    "add_decayed_weights",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_rms",
    "scale_by_rss",
    "scale_by_schedule",
    "scale_by_trust_ratio",
    "trace",
]

Scalar = float | torch.Tensor


def _bias_correction(decay: Scalar, t: torch.Tensor) -> torch.Tensor:
    """``1 - decay^t`` in float64, as torch.optim computes it on the host."""
    return 1.0 - torch.pow(
        torch.as_tensor(decay, dtype=torch.float64, device=t.device), t.to(torch.float64)
    )


def _ema(avg: list[torch.Tensor], new: list[torch.Tensor], decay: Scalar) -> list[torch.Tensor]:
    """``decay * avg + (1 - decay) * new`` (``lerp``, as torch.optim)."""
    return list(torch._foreach_lerp(avg, new, 1.0 - decay))


def _ema_of_squares(
    avg: list[torch.Tensor], g: list[torch.Tensor], decay: Scalar
) -> list[torch.Tensor]:
    """``decay * avg + (1 - decay) * g^2``."""
    out = list(torch._foreach_mul(avg, decay))
    if isinstance(decay, torch.Tensor):  # addcmul_ takes a Python scalar only
        torch._foreach_add_(out, torch._foreach_mul(torch._foreach_mul(g, g), 1.0 - decay))
    else:
        torch._foreach_addcmul_(out, g, g, value=1.0 - decay)
    return out


def _add_scaled(x: list[torch.Tensor], y: list[torch.Tensor], alpha: Scalar) -> list[torch.Tensor]:
    """``x + alpha * y`` in one pass where ``alpha`` is a Python number (no temporary)."""
    if isinstance(alpha, torch.Tensor):
        return list(torch._foreach_add(x, torch._foreach_mul(y, alpha)))
    return list(torch._foreach_add(x, y, alpha=alpha))


def scale(step_size: Scalar) -> GradientTransformation:
    """``u = step_size * g``."""

    def update(updates: PyTree, state: EmptyState, params: PyTree | None = None, **_: Any) -> tuple:
        g, spec = flat(updates)
        return (unflat(spec, torch._foreach_mul(g, step_size)) if g else updates), state

    return GradientTransformation(lambda params: EmptyState(), update)


class ScaleByScheduleState(NamedTuple):
    count: torch.Tensor


def scale_by_schedule(schedule: Schedule) -> GradientTransformation:
    """``u = schedule(count) * g``, with ``count`` the number of steps taken so far."""

    def init(params: PyTree) -> ScaleByScheduleState:
        return ScaleByScheduleState(counter(first_device(params)))

    def update(
        updates: PyTree, state: ScaleByScheduleState, params: PyTree | None = None, **_: Any
    ) -> tuple:
        g, spec = flat(updates)
        factor = torch.as_tensor(schedule(state.count))
        out = unflat(spec, torch._foreach_mul(g, factor)) if g else updates
        return out, ScaleByScheduleState(state.count + 1)

    return GradientTransformation(init, update)


def scale_by_learning_rate(
    learning_rate: ScalarOrSchedule, flip_sign: bool = True
) -> GradientTransformation:
    """``u = -lr * g`` (descent); ``lr`` a number, a 0-dim tensor or a schedule of the step."""
    sign = -1.0 if flip_sign else 1.0
    if callable(learning_rate):
        return scale_by_schedule(lambda count: sign * learning_rate(count))
    return scale(sign * learning_rate)


class ScaleByAdamState(NamedTuple):
    count: torch.Tensor
    mu: PyTree
    nu: PyTree


def scale_by_adam(
    b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-8, eps_root: Scalar = 0.0
) -> GradientTransformation:
    """Adam's direction (Kingma & Ba 2015), the form torch.optim computes::

    m = b1 m + (1 - b1) g         v = b2 v + (1 - b2) g^2
    u = (m / (1 - b1^t)) / (sqrt((v + eps_root) / (1 - b2^t)) + eps)
    """

    def init(params: PyTree) -> ScaleByAdamState:
        return ScaleByAdamState(
            counter(first_device(params)), zeros_like(params), zeros_like(params)
        )

    def update(
        updates: PyTree, state: ScaleByAdamState, params: PyTree | None = None, **_: Any
    ) -> tuple:
        g, spec = flat(updates)
        if not g:
            return updates, state
        t = state.count + 1
        mu = _ema(spec.flatten_up_to(state.mu), g, b1)
        nu = _ema_of_squares(spec.flatten_up_to(state.nu), g, b2)
        if eps_root:
            denom = torch._foreach_add(nu, eps_root)
            torch._foreach_sqrt_(denom)
        else:
            denom = torch._foreach_sqrt(nu)
        torch._foreach_div_(denom, torch.sqrt(_bias_correction(b2, t)).to(g[0].dtype))
        torch._foreach_add_(denom, eps)
        u = torch._foreach_div(mu, denom)
        torch._foreach_div_(u, _bias_correction(b1, t).to(g[0].dtype))
        return unflat(spec, u), ScaleByAdamState(t, unflat(spec, mu), unflat(spec, nu))

    return GradientTransformation(init, update)


class ScaleByRmsState(NamedTuple):
    nu: PyTree
    mu: PyTree  # running mean of g when centered, else None


def scale_by_rms(
    decay: Scalar = 0.99, eps: Scalar = 1e-8, centered: bool = False
) -> GradientTransformation:
    """RMSprop's direction (Hinton 2012), torch.optim's form with ``eps`` outside the root::

    v = decay v + (1 - decay) g^2,  m = decay m + (1 - decay) g  (centered only)
    u = g / (sqrt(v - m^2) + eps)
    """

    def init(params: PyTree) -> ScaleByRmsState:
        return ScaleByRmsState(zeros_like(params), zeros_like(params) if centered else None)

    def update(
        updates: PyTree, state: ScaleByRmsState, params: PyTree | None = None, **_: Any
    ) -> tuple:
        g, spec = flat(updates)
        if not g:
            return updates, state
        nu = _ema_of_squares(spec.flatten_up_to(state.nu), g, decay)
        mu = _ema(spec.flatten_up_to(state.mu), g, decay) if centered else None
        var = torch._foreach_sub(nu, torch._foreach_mul(mu, mu)) if centered else nu
        denom = torch._foreach_sqrt(var)
        torch._foreach_add_(denom, eps)
        u = torch._foreach_div(g, denom)
        return unflat(spec, u), ScaleByRmsState(
            unflat(spec, nu), unflat(spec, mu) if centered else None
        )

    return GradientTransformation(init, update)


class ScaleByRssState(NamedTuple):
    sum_of_squares: PyTree


def scale_by_rss(
    initial_accumulator_value: float = 0.0, eps: Scalar = 1e-10
) -> GradientTransformation:
    """Adagrad's direction (Duchi et al. 2011): ``s = s + g^2``, ``u = g / (sqrt(s) + eps)``."""

    def init(params: PyTree) -> ScaleByRssState:
        leaves, spec = flat(params)
        return ScaleByRssState(
            unflat(spec, [torch.full_like(x, initial_accumulator_value) for x in leaves])
        )

    def update(
        updates: PyTree, state: ScaleByRssState, params: PyTree | None = None, **_: Any
    ) -> tuple:
        g, spec = flat(updates)
        if not g:
            return updates, state
        s = torch._foreach_add(spec.flatten_up_to(state.sum_of_squares), torch._foreach_mul(g, g))
        denom = torch._foreach_sqrt(s)
        torch._foreach_add_(denom, eps)
        return unflat(spec, torch._foreach_div(g, denom)), ScaleByRssState(unflat(spec, s))

    return GradientTransformation(init, update)


class ScaleByLionState(NamedTuple):
    mu: PyTree


def scale_by_lion(b1: Scalar = 0.9, b2: Scalar = 0.99) -> GradientTransformation:
    """Lion's direction (Chen et al. 2023)::

    u = sign(b1 m + (1 - b1) g),   then   m = b2 m + (1 - b2) g
    """

    def init(params: PyTree) -> ScaleByLionState:
        return ScaleByLionState(zeros_like(params))

    def update(
        updates: PyTree, state: ScaleByLionState, params: PyTree | None = None, **_: Any
    ) -> tuple:
        g, spec = flat(updates)
        if not g:
            return updates, state
        m = spec.flatten_up_to(state.mu)
        u = torch._foreach_sign(_ema(m, g, b1))
        return unflat(spec, u), ScaleByLionState(unflat(spec, _ema(m, g, b2)))

    return GradientTransformation(init, update)


class TraceState(NamedTuple):
    trace: PyTree


def trace(decay: Scalar, nesterov: bool = False) -> GradientTransformation:
    """Momentum: ``b = g + decay b``; ``u = b``, or ``u = g + decay b`` with Nesterov (the
    form of torch.optim.SGD with ``dampening=0``)."""

    def init(params: PyTree) -> TraceState:
        return TraceState(zeros_like(params))

    def update(updates: PyTree, state: TraceState, params: PyTree | None = None, **_: Any) -> tuple:
        g, spec = flat(updates)
        if not g:
            return updates, state
        b = _add_scaled(g, spec.flatten_up_to(state.trace), decay)
        u = _add_scaled(g, b, decay) if nesterov else b
        return unflat(spec, u), TraceState(unflat(spec, b))

    return GradientTransformation(init, update)


def add_decayed_weights(
    weight_decay: Scalar, mask: MaskOrFn | None = None
) -> GradientTransformation:
    """``u = g + weight_decay * params``, only where ``mask`` (a bool tree or a function of
    params giving one) is True when it is given."""

    def update(updates: PyTree, state: EmptyState, params: PyTree | None = None, **_: Any) -> tuple:
        if params is None:
            raise ValueError("add_decayed_weights needs params: call update(grads, state, params)")
        g, spec = flat(updates)
        if not g:
            return updates, state
        p = spec.flatten_up_to(params)
        return unflat(spec, _add_scaled(g, p, weight_decay)), state

    decay = GradientTransformation(lambda params: EmptyState(), update)
    return decay if mask is None else masked(decay, mask)


def scale_by_trust_ratio(min_norm: float = 0.0, eps: float = 0.0) -> GradientTransformation:
    """LAMB's layer-wise trust ratio (You et al. 2020): ``u = g * ||p|| / ||g||`` per leaf,
    with ratio 1 where either norm is zero (``||p||`` is clamped below by ``min_norm``)."""

    def update(updates: PyTree, state: EmptyState, params: PyTree | None = None, **_: Any) -> tuple:
        if params is None:
            raise ValueError("scale_by_trust_ratio needs params: call update(grads, state, params)")
        g, spec = flat(updates)
        if not g:
            return updates, state
        p_norm = torch.stack(torch._foreach_norm(spec.flatten_up_to(params))).clamp_min(min_norm)
        g_norm = torch.stack(torch._foreach_norm(g))
        ratio = torch.where(
            (p_norm > 0) & (g_norm > 0), p_norm / (g_norm + eps), torch.ones_like(p_norm)
        )
        return unflat(spec, torch._foreach_mul(g, list(ratio.unbind()))), state

    return GradientTransformation(lambda params: EmptyState(), update)
