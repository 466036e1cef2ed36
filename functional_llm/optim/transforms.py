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

from functional_llm.optim import _foreach as ops
from functional_llm.optim.base import (
    GradientTransformation,
    MaskOrFn,
    PyTree,
    ScalarOrSchedule,
    Schedule,
    counter,
    first_device,
    flat,
    stateless,
    unflat,
    up_to,
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
    "ema",
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


def scale(step_size: Scalar) -> GradientTransformation:
    """``u = step_size * g``."""
    return stateless(lambda g, p: ops.mul(g, step_size))


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
        out = unflat(spec, ops.mul(g, torch.as_tensor(schedule(state.count)))) if g else updates
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
        mu = ops.ema(up_to(spec, state.mu), g, b1)
        nu = ops.ema_of_squares(up_to(spec, state.nu), g, b2)
        u = ops.adam_direction(mu, nu, t, b1, b2, eps, eps_root)
        return unflat(spec, u), ScaleByAdamState(t, unflat(spec, mu), unflat(spec, nu))

    return GradientTransformation(init, update)


class ScaleByRmsState(NamedTuple):
    nu: PyTree
    mu: PyTree  # running mean of g when centered, else None


def scale_by_rms(
    decay: Scalar = 0.99, eps: Scalar = 1e-8, centered: bool = False, eps_in_sqrt: bool = False
) -> GradientTransformation:
    """RMSprop's direction (Hinton 2012)::

    v = decay v + (1 - decay) g^2,  m = decay m + (1 - decay) g  (centered only; else m = 0)
    u = g / (sqrt(v - m^2) + eps)      torch.optim.RMSprop's form, the default
    u = g / sqrt(v - m^2 + eps)        eps_in_sqrt=True: Optax's (``scale_by_rms``,
                                       ``scale_by_stddev``)
    """

    def init(params: PyTree) -> ScaleByRmsState:
        return ScaleByRmsState(zeros_like(params), zeros_like(params) if centered else None)

    def update(
        updates: PyTree, state: ScaleByRmsState, params: PyTree | None = None, **_: Any
    ) -> tuple:
        g, spec = flat(updates)
        if not g:
            return updates, state
        nu = ops.ema_of_squares(up_to(spec, state.nu), g, decay)
        mu = ops.ema(up_to(spec, state.mu), g, decay) if centered else None
        var = ops.sub(nu, ops.mul(mu, mu)) if centered and mu is not None else nu
        if eps_in_sqrt:
            u = ops.div(g, ops.sqrt(ops.add_scalar(var, eps)))
        else:
            u = ops.div(g, ops.add_scalar(ops.sqrt(var), eps))
        return unflat(spec, u), ScaleByRmsState(
            unflat(spec, nu), None if mu is None else unflat(spec, mu)
        )

    return GradientTransformation(init, update)


class ScaleByRssState(NamedTuple):
    sum_of_squares: PyTree


def scale_by_rss(
    initial_accumulator_value: float = 0.0, eps: Scalar = 1e-10, eps_in_sqrt: bool = False
) -> GradientTransformation:
    """Adagrad's direction (Duchi et al. 2011)::

    s = s + g^2
    u = g / (sqrt(s) + eps)                     torch.optim.Adagrad's form, the default
    u = g / sqrt(s + eps) where s > 0, else 0   eps_in_sqrt=True: Optax's ``scale_by_rss``
    """

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
        s = ops.add(up_to(spec, state.sum_of_squares), ops.mul(g, g))
        if eps_in_sqrt:
            u = [
                torch.where(t > 0, x * torch.rsqrt(t + eps), 0.0) for x, t in zip(g, s, strict=True)
            ]
        else:
            u = ops.div(g, ops.add_scalar(ops.sqrt(s), eps))
        return unflat(spec, u), ScaleByRssState(unflat(spec, s))

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
        m = up_to(spec, state.mu)
        u = ops.sign(ops.ema(m, g, b1))
        return unflat(spec, u), ScaleByLionState(unflat(spec, ops.ema(m, g, b2)))

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
        b = ops.add(g, up_to(spec, state.trace), decay)
        u = ops.add(g, b, decay) if nesterov else b
        return unflat(spec, u), TraceState(unflat(spec, b))

    return GradientTransformation(init, update)


def ema(decay: Scalar) -> GradientTransformation:
    """A moving average of the updates: ``b = decay b + (1 - decay) u``; ``u = b``, without
    debiasing (Optax's ``ema(decay, debias=False)``; Adafactor's momentum)."""

    def init(params: PyTree) -> TraceState:
        return TraceState(zeros_like(params))

    def update(updates: PyTree, state: TraceState, params: PyTree | None = None, **_: Any) -> tuple:
        u, spec = flat(updates)
        if not u:
            return updates, state
        b = ops.ema(up_to(spec, state.trace), u, decay)
        return unflat(spec, b), TraceState(unflat(spec, b))

    return GradientTransformation(init, update)


def add_decayed_weights(
    weight_decay: Scalar, mask: MaskOrFn | None = None
) -> GradientTransformation:
    """``u = g + weight_decay * params``, only where ``mask`` (a bool tree or a function of
    params giving one) is True when it is given."""
    decay = stateless(lambda g, p: ops.add(g, p, weight_decay), needs_params="add_decayed_weights")
    return decay if mask is None else masked(decay, mask)


def scale_by_trust_ratio(min_norm: float = 0.0, eps: float = 0.0) -> GradientTransformation:
    """LAMB's layer-wise trust ratio (You et al. 2020): ``u = g * ||p|| / ||g||`` per leaf,
    with ratio 1 where either norm is zero (``||p||`` is clamped below by ``min_norm``)."""

    def rescale(g: list[torch.Tensor], p: list[torch.Tensor]) -> list[torch.Tensor]:
        p_norm = torch.stack(ops.norms(p)).clamp_min(min_norm)
        g_norm = torch.stack(ops.norms(g))
        ratio = torch.where(
            (p_norm > 0) & (g_norm > 0), p_norm / (g_norm + eps), torch.ones_like(p_norm)
        )
        return ops.mul(g, list(ratio.unbind()))

    return stateless(rescale, needs_params="scale_by_trust_ratio")
