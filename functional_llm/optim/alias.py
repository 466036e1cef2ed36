"""The usual optimizers, each a :func:`chain` of transforms.

The update rules and defaults follow ``torch.optim`` where it has the optimizer (``sgd``,
``adam``, ``adamw``, ``rmsprop``, ``adagrad``; checked step by step in the tests) and the
papers otherwise (``lion``, ``adafactor``, ``lamb``). ``learning_rate`` is a number, a
0-dim tensor or a schedule; every numeric hyperparameter may be a tensor, as
:func:`inject_hyperparams` provides.
"""

from __future__ import annotations

from typing import Any

import optree
import torch

from functional_llm.optim import _foreach as ops
from functional_llm.optim.base import (
    GradientTransformation,
    MaskOrFn,
    PyTree,
    ScalarOrSchedule,
    chain,
    flat,
    identity,
    per_structure,
    unflat,
    up_to,
)
from functional_llm.optim.factored import (
    clip_by_block_rms,
    scale_by_factored_rms,
    scale_by_param_block_rms,
)
from functional_llm.optim.transforms import (
    Scalar,
    ScaleByAdamState,
    ScaleByScheduleState,
    add_decayed_weights,
    ema,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_rms,
    scale_by_rss,
    scale_by_trust_ratio,
    trace,
)

__all__ = ["adafactor", "adagrad", "adam", "adamw", "lamb", "lion", "rmsprop", "sgd"]


def _python_zero(value: Scalar) -> bool:
    """Whether ``value`` is a Python zero (a tensor never is: it may change, e.g. injected)."""
    return not isinstance(value, torch.Tensor) and value == 0


def _unless_zero(value: Scalar, transform: GradientTransformation) -> GradientTransformation:
    """``transform``, or nothing when ``value`` is a Python zero (a tensor is always kept)."""
    return identity() if _python_zero(value) else transform


def _decay(weight_decay: Scalar, mask: MaskOrFn | None) -> GradientTransformation:
    return _unless_zero(weight_decay, add_decayed_weights(weight_decay, mask))


def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: Scalar = 0.0,
    nesterov: bool = False,
    weight_decay: Scalar = 0.0,
) -> GradientTransformation:
    """SGD with optional (Nesterov) momentum and L2 weight decay, as ``torch.optim.SGD``."""
    if nesterov and isinstance(momentum, float | int) and momentum <= 0:
        raise ValueError("sgd: nesterov momentum needs momentum > 0")
    return chain(
        _unless_zero(weight_decay, add_decayed_weights(weight_decay)),
        _unless_zero(momentum, trace(momentum, nesterov)),
        scale_by_learning_rate(learning_rate),
    )


def adam(
    learning_rate: ScalarOrSchedule,
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
) -> GradientTransformation:
    """Adam (Kingma & Ba 2015); ``weight_decay`` is L2 added to the gradient, as in
    ``torch.optim.Adam`` (use :func:`adamw` for decoupled decay)."""
    return chain(
        _unless_zero(weight_decay, add_decayed_weights(weight_decay)),
        scale_by_adam(b1, b2, eps),
        scale_by_learning_rate(learning_rate),
    )


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 1e-2,
    mask: MaskOrFn | None = None,
) -> GradientTransformation:
    """AdamW (Loshchilov & Hutter 2019): ``u = -lr (adam(g) + wd p)``, decay restricted to
    ``mask`` (e.g. not norms and biases).

    The default ``weight_decay=1e-2`` is ``torch.optim.AdamW``'s; Optax's ``adamw`` defaults to
    1e-4, so pass ``weight_decay=1e-4`` to match an Optax run that kept its default. Both scale
    the decay by the learning rate, as here.

    Its ``update_in_place`` takes the same step with ``torch.optim.AdamW(fused=True)``'s kernel
    in the buffers of params and state (the state keeps the structure ``update`` gives it), one
    kernel call per decay group: what :func:`update_and_apply` runs with ``donate=True``."""
    adam = scale_by_adam(b1, b2, eps)
    opt = chain(adam, _decay(weight_decay, mask), scale_by_learning_rate(learning_rate))
    decays = per_structure(mask)

    def decayed(spec: optree.PyTreeSpec, params: PyTree) -> list[bool]:
        """Per leaf of ``spec``, whether ``mask`` decays it."""
        return (
            [True] * spec.num_leaves
            if mask is None
            else [bool(d) for d in up_to(spec, decays(params))]
        )

    def update(grads: PyTree, state: tuple, params: PyTree | None = None, **_: Any) -> tuple:
        """The chain's update, the same arithmetic in the same order (so the same bits), with
        the decay and the learning rate written into the Adam direction, which this update
        made and nothing else holds: two fewer params-sized allocations a step."""
        adam_state, decay_state, lr_state = state
        direction, adam_state = adam.update(grads, adam_state, params)
        u, spec = flat(direction)
        if not u:
            return opt.update(grads, state, params)
        if not _python_zero(weight_decay):
            if params is None:
                raise ValueError("adamw needs params: call update(grads, state, params)")
            p = up_to(spec, params)
            group = [i for i, keep in enumerate(decayed(spec, params)) if keep]
            if group:
                ops.add_scaled_([u[i] for i in group], [p[i] for i in group], weight_decay)
        if callable(learning_rate):
            ops.mul_(u, torch.as_tensor(-1.0 * learning_rate(lr_state.count)))
            lr_state = ScaleByScheduleState(lr_state.count + 1)
        else:
            ops.mul_(u, -1.0 * learning_rate)
        return unflat(spec, u), (adam_state, decay_state, lr_state)

    def update_in_place(params: PyTree, grads: PyTree, state: tuple) -> tuple[PyTree, tuple]:
        adam, decay_state, lr_state = state
        p, spec = flat(params)
        if not p:
            return params, state
        g = up_to(spec, grads)
        mu, nu = up_to(spec, adam.mu), up_to(spec, adam.nu)
        if callable(learning_rate):
            lr = torch.as_tensor(learning_rate(lr_state.count))
            lr_state = ScaleByScheduleState(lr_state.count.add_(1))
        else:
            lr = learning_rate
        count = adam.count.add_(1)
        step = count.to(torch.float32)  # the fused kernel's step type
        flags = decayed(spec, params)
        for decay in set(flags):  # one fused call per group: decayed, and not
            group = [i for i, d in enumerate(flags) if d == decay]
            pick = lambda xs, group=group: [xs[i] for i in group]  # noqa: E731
            ops.fused_adamw_(
                pick(p),
                pick(g),
                pick(mu),
                pick(nu),
                step,
                lr=lr,
                b1=float(b1),
                b2=float(b2),
                eps=float(eps),
                weight_decay=float(weight_decay) if decay else 0.0,
            )
        adam = ScaleByAdamState(count, unflat(spec, mu), unflat(spec, nu))
        return unflat(spec, p), (adam, decay_state, lr_state)

    return opt._replace(update=update, update_in_place=update_in_place)


def rmsprop(
    learning_rate: ScalarOrSchedule,
    alpha: Scalar = 0.99,
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    momentum: Scalar = 0.0,
    centered: bool = False,
    eps_in_sqrt: bool = False,
) -> GradientTransformation:
    """RMSprop as ``torch.optim.RMSprop``: ``u = -lr g / (sqrt(v) + eps)``, momentum on
    ``g / rms`` (:func:`scale_by_rms`).

    Where Optax differs: it puts ``eps`` inside the root, ``g / sqrt(v + eps)``
    (``eps_in_sqrt=True`` here), and its default ``decay`` is 0.9 where torch's ``alpha`` is
    0.99. The two forms part where ``v`` is near ``eps``: for ``v = 0`` the update is
    ``g / eps`` against ``g / sqrt(eps)``."""
    return chain(
        _unless_zero(weight_decay, add_decayed_weights(weight_decay)),
        scale_by_rms(alpha, eps, centered, eps_in_sqrt),
        _unless_zero(momentum, trace(momentum)),
        scale_by_learning_rate(learning_rate),
    )


def adagrad(
    learning_rate: ScalarOrSchedule,
    initial_accumulator_value: float = 0.0,
    eps: Scalar = 1e-10,
    weight_decay: Scalar = 0.0,
    eps_in_sqrt: bool = False,
) -> GradientTransformation:
    """Adagrad as ``torch.optim.Adagrad``: ``u = -lr g / (sqrt(s) + eps)`` (no ``lr_decay``:
    pass a schedule instead; :func:`scale_by_rss`).

    Where Optax differs: ``eps`` inside the root and a zero update where ``s = 0``
    (``eps_in_sqrt=True`` here), and its defaults are ``initial_accumulator_value=0.1`` and
    ``eps=1e-7`` where torch's are 0 and 1e-10: pass those for Optax's ``adagrad``."""
    return chain(
        _unless_zero(weight_decay, add_decayed_weights(weight_decay)),
        scale_by_rss(initial_accumulator_value, eps, eps_in_sqrt),
        scale_by_learning_rate(learning_rate),
    )


def lion(
    learning_rate: ScalarOrSchedule,
    b1: Scalar = 0.9,
    b2: Scalar = 0.99,
    weight_decay: Scalar = 0.0,
    mask: MaskOrFn | None = None,
) -> GradientTransformation:
    """Lion (Chen et al. 2023): ``u = -lr (sign(b1 m + (1 - b1) g) + wd p)``."""
    return chain(
        scale_by_lion(b1, b2), _decay(weight_decay, mask), scale_by_learning_rate(learning_rate)
    )


def lamb(
    learning_rate: ScalarOrSchedule,
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-6,
    weight_decay: Scalar = 0.0,
    mask: MaskOrFn | None = None,
) -> GradientTransformation:
    """LAMB (You et al. 2020): Adam's direction plus decoupled decay, rescaled per leaf by the
    trust ratio ``||p|| / ||u||``."""
    return chain(
        scale_by_adam(b1, b2, eps),
        _decay(weight_decay, mask),
        scale_by_trust_ratio(),
        scale_by_learning_rate(learning_rate),
    )


def adafactor(
    learning_rate: ScalarOrSchedule,
    min_dim_size_to_factor: int = 128,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold: float | None = 1.0,
    momentum: Scalar = 0.0,
    weight_decay: Scalar = 0.0,
    eps: float = 1e-30,
    factored: bool = True,
) -> GradientTransformation:
    """Adafactor (Shazeer & Stern 2018): factored second moments, update clipping at RMS
    ``clipping_threshold``, step size relative to each parameter block's RMS; ``momentum`` is
    a moving average of the updates (``b = m b + (1 - m) u``, as in the paper, Optax and
    Hugging Face), not an accumulated sum."""
    return chain(
        scale_by_factored_rms(factored, decay_rate, decay_offset, min_dim_size_to_factor, eps),
        clip_by_block_rms(clipping_threshold) if clipping_threshold is not None else identity(),
        scale_by_param_block_rms() if multiply_by_parameter_scale else identity(),
        _unless_zero(momentum, ema(momentum)),
        _unless_zero(weight_decay, add_decayed_weights(weight_decay)),
        scale_by_learning_rate(learning_rate),
    )
