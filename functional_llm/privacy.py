"""Per-example gradients and differentially private SGD (Abadi et al. 2016), with the Rényi-DP
accountant of the sampled Gaussian mechanism (Mironov, Talwar and Zhang 2019).

    g_i  = grad loss(params, example_i)                        vmap of grad: one pass, no loop
    g_i' = g_i min(1, C / ||g_i||)                              each example's clipped gradient
    g    = (sum_i g_i' + sigma C xi) / B,   xi ~ N(0, I)          noise scaled to the clip norm

After ``T`` steps that each sample a fraction ``q`` of the data, the run is ``(eps, delta)``-DP
with ``eps = min_a T RDP_a(q, sigma) + log(1/delta)/(1-a)`` (the conversion opacus uses):
:func:`epsilon`. The accountant is ours rather than opacus' so that the core needs no extra
package; the tests check it against opacus' own on drawn settings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import optree
import torch

from functional_llm import random
from functional_llm.optim.base import GradientTransformation, update_and_apply
from functional_llm.optim.clipping import global_norm
from functional_llm.train import Step, TrainState, value_and_grad
from functional_llm.types import Batch, Key, LossFn, Metrics, PyTree

__all__ = [
    "DEFAULT_ORDERS",
    "clip_and_noise",
    "dp_aggregate",
    "epsilon",
    "make_dp_step",
    "per_example_grads",
    "rdp",
]

#: The Rényi orders searched for the best epsilon (opacus' defaults).
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
)


def per_example_grads(
    loss_fn: LossFn, params: PyTree, batch: Batch, key: Key | None = None
) -> tuple[torch.Tensor, PyTree]:
    """``(losses (B,), grads)``: each example's loss and gradient, every grad leaf with a
    leading ``B`` axis. Example ``i`` is the batch of one ``batch[...][i:i+1]``, with dropout
    key ``fold_in(key, i)``; one ``vmap`` of ``grad``, no loop."""
    n = {x.shape[0] for x in batch.values()}
    if len(n) != 1:
        raise ValueError(f"per_example_grads: batch entries disagree on the batch size: {n}")
    size = n.pop()

    def one(p: PyTree, example: Batch, k: Key | None) -> tuple[torch.Tensor, Any]:
        return loss_fn(p, {name: x[None] for name, x in example.items()}, k)

    grad_fn = value_and_grad(one, method="func")
    if key is None:
        (losses, _), grads = torch.func.vmap(grad_fn, in_dims=(None, 0, None))(params, batch, None)
    else:
        keys = torch.stack([random.fold_in(key, i) for i in range(size)])
        (losses, _), grads = torch.func.vmap(grad_fn, in_dims=(None, 0, 0))(params, batch, keys)
    return losses, grads


def clip_and_noise(
    grads: PyTree, l2_clip: float, noise_multiplier: float, key: Key | None
) -> tuple[PyTree, torch.Tensor]:
    """The private mean of per-example ``grads`` (leading ``B`` axis): each example clipped to
    L2 norm ``l2_clip`` over all its leaves, summed, Gaussian noise of std ``noise_multiplier *
    l2_clip`` added (from ``key``), divided by ``B``. Also returns the fraction clipped."""
    _check(l2_clip, noise_multiplier)
    leaves, spec = optree.tree_flatten(grads)
    b = leaves[0].shape[0]
    norms = torch.sqrt(sum(x.reshape(b, -1).double().pow(2).sum(-1) for x in leaves))  # type: ignore[arg-type]
    factor = (l2_clip / (norms + 1e-6)).clamp(max=1.0)
    summed = [torch.einsum("b,b...->...", factor.to(x.dtype), x) for x in leaves]
    if noise_multiplier:
        if key is None:
            raise ValueError("clip_and_noise: noise needs a key")
        keys = random.split(key, len(leaves))
        std = noise_multiplier * l2_clip
        summed = [
            s + std * random.normal(k, s.shape, dtype=s.dtype)
            for s, k in zip(summed, keys, strict=True)
        ]
    mean = optree.tree_unflatten(spec, [s / b for s in summed])
    return mean, (factor < 1.0).float().mean()


def _check(l2_clip: float, noise_multiplier: float) -> None:
    if not l2_clip > 0:
        raise ValueError(f"DP-SGD: l2_clip must be positive (math.inf: no clipping), got {l2_clip}")
    if not noise_multiplier >= 0:
        raise ValueError(f"DP-SGD: noise_multiplier must be >= 0, got {noise_multiplier}")


def dp_aggregate(l2_clip: float, noise_multiplier: float, key: Key) -> GradientTransformation:
    """Optax's ``differentially_private_aggregate`` as a transform: per-example gradients in,
    their clipped, noised mean out; the state is the noise key and a step count (step ``t``
    draws with ``fold_in(key, t)``). Chain an optimizer after it for DP-Adam and the like."""
    _check(l2_clip, noise_multiplier)

    def init(params: PyTree) -> dict[str, torch.Tensor]:
        return {"key": key, "count": torch.zeros((), dtype=torch.int64, device=key.device)}

    def update(updates: PyTree, state: PyTree, params: PyTree | None = None, **extra: Any) -> tuple:
        noise_key = random.fold_in(state["key"], state["count"])
        mean, _ = clip_and_noise(updates, l2_clip, noise_multiplier, noise_key)
        return mean, {"key": state["key"], "count": state["count"] + 1}

    return GradientTransformation(init, update)


def make_dp_step(
    loss_fn: LossFn, optimizer: GradientTransformation, *, l2_clip: float, noise_multiplier: float
) -> Step:
    """A DP-SGD train step ``(state, batch) -> (state, metrics)``: per-example gradients,
    :func:`clip_and_noise` (noise from ``fold_in(fold_in(state.key, step), 1)``), then
    ``optimizer``. With ``noise_multiplier=0`` and ``l2_clip=math.inf`` it is the plain step on
    the mean of per-example losses. metrics: ``loss`` (mean), ``grad_norm`` (of the private
    gradient), ``clipped`` (fraction of examples clipped)."""
    _check(l2_clip, noise_multiplier)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        key = random.fold_in(state.key, state.step)
        dropout_key, noise_key = random.fold_in(key, 0), random.fold_in(key, 1)
        losses, grads = per_example_grads(loss_fn, state.params, batch, dropout_key)
        private, clipped = clip_and_noise(grads, l2_clip, noise_multiplier, noise_key)
        params, opt_state = update_and_apply(optimizer, state.params, private, state.opt_state)
        metrics = {"loss": losses.mean(), "grad_norm": global_norm(private), "clipped": clipped}
        return TrainState(params, opt_state, state.step + 1, state.key), metrics

    return step


# -- the accountant ----------------------------------------------------------------------------


def _log_add(a: float, b: float) -> float:
    lo, hi = min(a, b), max(a, b)
    return hi if lo == -math.inf else math.log1p(math.exp(lo - hi)) + hi


def _log_sub(a: float, b: float) -> float:
    """``log(e^a - e^b)`` for ``a >= b``."""
    if b == -math.inf:
        return a
    if a <= b:
        return -math.inf
    return math.log(math.expm1(a - b)) + b if a - b < 700 else a


def _log_erfc(x: float) -> float:
    if x < 25:
        return math.log(math.erfc(x))
    # the asymptotic series where erfc underflows
    return -x * x - math.log(x) - 0.5 * math.log(math.pi) + math.log1p(-0.5 / x**2 + 0.75 / x**4)


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    log_a = -math.inf
    for i in range(alpha + 1):
        coef = math.log(math.comb(alpha, i)) + i * math.log(q) + (alpha - i) * math.log1p(-q)
        log_a = _log_add(log_a, coef + (i * i - i) / (2 * sigma**2))
    return log_a


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """The two-sided series of Mironov et al. (2019, Sec. 3.3) for a fractional order."""
    log_a0 = log_a1 = -math.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    coef, i = 1.0, 0  # coef = binom(alpha, i), built by its recurrence (it changes sign)
    while True:
        j = alpha - i
        log_coef = math.log(abs(coef))
        log_t0 = log_coef + i * math.log(q) + j * math.log1p(-q)
        log_t1 = log_coef + j * math.log(q) + i * math.log1p(-q)
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
        if coef > 0:
            log_a0, log_a1 = _log_add(log_a0, log_s0), _log_add(log_a1, log_s1)
        else:
            log_a0, log_a1 = _log_sub(log_a0, log_s0), _log_sub(log_a1, log_s1)
        if max(log_s0, log_s1) < -30:
            return _log_add(log_a0, log_a1)
        coef *= (alpha - i) / (i + 1)
        i += 1


def rdp(
    sample_rate: float, noise_multiplier: float, steps: int, orders: Sequence[float]
) -> list[float]:
    """The Rényi DP of ``steps`` compositions of the sampled Gaussian mechanism, per order."""
    if not 0 <= sample_rate <= 1:
        raise ValueError(f"rdp: sample_rate must be in [0, 1], got {sample_rate}")
    if noise_multiplier < 0 or steps < 0:
        raise ValueError("rdp: noise_multiplier and steps must be >= 0")
    out = []
    for a in orders:
        if sample_rate == 0:
            value = 0.0
        elif noise_multiplier == 0 or math.isinf(a):
            value = math.inf
        elif sample_rate == 1:
            value = a / (2 * noise_multiplier**2)
        elif float(a).is_integer():
            value = _log_a_int(sample_rate, noise_multiplier, int(a)) / (a - 1)
        else:
            value = _log_a_frac(sample_rate, noise_multiplier, a) / (a - 1)
        out.append(steps * value)
    return out


def epsilon(
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> tuple[float, float]:
    """``(epsilon, best order)`` of DP-SGD after ``steps`` steps that each sample a fraction
    ``sample_rate`` of the data with Gaussian noise ``noise_multiplier``, at ``delta``."""
    if not 0 < delta < 1:
        raise ValueError(f"epsilon: delta must be in (0, 1), got {delta}")
    best = (math.inf, math.nan)
    for a, r in zip(orders, rdp(sample_rate, noise_multiplier, steps, orders), strict=True):
        if a <= 1:
            continue
        eps = r - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        if eps < best[0]:
            best = (eps, a)
    return best
