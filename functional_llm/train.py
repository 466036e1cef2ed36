"""The train step: one pure function ``(state, batch) -> (state, metrics)``.

:func:`make_step` composes it from a loss ``loss_fn(params, batch, key) -> (loss, aux)`` (see
:mod:`functional_llm.losses`) and an optimizer (:mod:`functional_llm.optim`)::

    key_t      = fold_in(state.key, state.step)                 fresh dropout keys every step
    g          = sum_i n_i grad L_i(params) / sum_i n_i          k micro-batches, n_i counted tokens
    g          = g min(1, c / ||g||)                             optional global-norm clip
    u, opt     = optimizer.update(g, opt_state, params)
    params     = params + u

Everything that changes is in :class:`TrainState` (params, optimizer state, step, key), and the
step counter, the learning rate and the key are tensors, so :func:`compile` (``torch.compile``
with the settings below, ``fullgraph=True``) compiles once for a whole run. A step is an
ordinary function: wrap it to add an EMA of the params, an extra loss term or logging, without
touching this module.

**The gradient path** is :func:`value_and_grad`, built on ``torch.autograd.grad``, chosen over
``torch.func.grad_and_value`` on measurements (``benchmarks/gradient_path.py``; the figures are
in the README): the same speed, half the eager peak memory, and it runs activation
checkpointing (:func:`functional_llm.nn.remat`), which ``torch.func.grad`` refuses
(pytorch#122729); DTensor methods also stay available inside the loss. Dynamo traces it into
one graph when ``torch._dynamo.config.trace_autograd_ops`` is on: :func:`compile` turns it on
around each call of the compiled function only, so importing this module changes no global
setting.

``value_and_grad(..., method="func")`` is there for what only ``torch.func`` does: a step that
is itself vmapped (ensembles) or differentiated again.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar, cast

import optree
import torch

from functional_llm import random
from functional_llm.optim.base import GradientTransformation, update_and_apply
from functional_llm.optim.clipping import clip_factor, global_norm
from functional_llm.optim.combinators import hyperparams
from functional_llm.types import Batch, LossFn, Metrics, PyTree

__all__ = [
    "Precision",
    "TrainState",
    "compile",
    "evaluate",
    "first_nonfinite",
    "init_state",
    "make_eval_step",
    "make_step",
    "value_and_grad",
]

F = TypeVar("F", bound=Callable[..., Any])
Step = Callable[["TrainState", Batch], tuple["TrainState", Metrics]]


class TrainState(NamedTuple):
    """Everything a run carries from step to step; a pytree, so it saves, shards and compiles."""

    params: PyTree
    opt_state: PyTree
    step: torch.Tensor  # int64 scalar: steps taken
    key: torch.Tensor  # the run's base key; step t uses fold_in(key, t)


def init_state(params: PyTree, optimizer: GradientTransformation, key: torch.Tensor) -> TrainState:
    """A fresh state at step 0."""
    step = torch.zeros((), dtype=torch.int64, device=key.device)
    return TrainState(params, optimizer.init(params), step, key)


def compile(fn: F, /, **options: Any) -> F:
    """``torch.compile(fn, **options)`` (``fullgraph=True`` unless given), called with the
    dynamo settings a step of this library needs: ``trace_autograd_ops``, so that
    :func:`value_and_grad` compiles into the graph. The settings are patched around each call
    of the compiled function and restored after it; nothing global changes."""
    compiled = torch.compile(fn, **{"fullgraph": True, **options})

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return compiled(*args, **kwargs)

    return cast(F, run)


def value_and_grad(
    fn: Callable[..., tuple[torch.Tensor, Any]], method: str = "autograd"
) -> Callable[..., tuple[tuple[torch.Tensor, Any], PyTree]]:
    """``fn(params, *args) -> (loss, aux)`` to ``(params, *args) -> ((loss, aux), grads)``.

    ``grads`` has ``params``' structure; floating leaves that do not reach the loss get zeros,
    non-floating leaves (integer buffers) get ``None``. ``params`` is not modified: the
    gradient is taken with respect to detached aliases of its leaves. ``method="func"`` uses
    ``torch.func.grad_and_value`` instead (composes with vmap and higher-order grads; no remat).
    """
    if method not in ("autograd", "func"):
        raise ValueError(f"value_and_grad: method must be 'autograd' or 'func', got {method!r}")

    def wrapped(params: PyTree, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = optree.tree_flatten(params)
        floating = [i for i, x in enumerate(leaves) if x.is_floating_point()]

        def of(differentiable: list[torch.Tensor]) -> tuple[torch.Tensor, Any]:
            live = list(leaves)
            for i, x in zip(floating, differentiable, strict=True):
                live[i] = x
            return fn(optree.tree_unflatten(spec, live), *args, **kwargs)

        if method == "func":
            grads, (loss, aux) = torch.func.grad_and_value(of, has_aux=True)(
                [leaves[i] for i in floating]
            )
        else:
            differentiable = [leaves[i].detach().requires_grad_() for i in floating]
            with torch.enable_grad():
                loss, aux = of(differentiable)
                grads = torch.autograd.grad(
                    loss, differentiable, allow_unused=True, materialize_grads=True
                )
        out: list[torch.Tensor | None] = [None] * len(leaves)
        for i, g in zip(floating, grads, strict=True):
            out[i] = g
        return (loss.detach(), aux), optree.tree_unflatten(spec, out)

    return wrapped


@dataclass(frozen=True)
class Precision:
    """Mixed precision: params kept (and updated) in ``param_dtype``, cast to ``compute_dtype``
    for the forward and backward pass. Gradients come back in ``param_dtype`` (the cast's
    backward), losses are computed in float32 (:func:`~functional_llm.losses.cross_entropy`
    upcasts the logits). ``Precision("float32", "bfloat16")`` is the usual bf16 recipe."""

    param_dtype: torch.dtype | str = torch.float32
    compute_dtype: torch.dtype | str = torch.float32

    def __post_init__(self) -> None:
        for name in ("param_dtype", "compute_dtype"):
            value = getattr(self, name)
            dtype = getattr(torch, value, None) if isinstance(value, str) else value
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise ValueError(f"Precision.{name} must be a floating dtype, got {value!r}")
            object.__setattr__(self, name, dtype)

    def cast(self, params: PyTree) -> PyTree:
        """Params in the compute dtype (floating leaves only; a no-op when already there)."""
        dtype = self.compute_dtype
        return optree.tree_map(
            lambda x: x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x, params
        )


def _split(batch: Batch, k: int) -> list[dict[str, torch.Tensor]]:
    """``k`` micro-batches along the leading (batch) axis."""
    sizes = {name: x.shape[0] for name, x in batch.items()}
    bad = {name: n for name, n in sizes.items() if n % k}
    if bad:
        raise ValueError(f"make_step: accumulate={k} must divide the batch size; got {bad}")
    chunks = {name: x.chunk(k) for name, x in batch.items()}
    return [{name: chunks[name][i] for name in batch} for i in range(k)]


def _shares(counts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each part's share of the counted tokens (all zero if nothing was counted)."""
    c = torch.stack([x.float() for x in counts])
    return list(c / c.sum().clamp(min=1))


def _mix(values: list[torch.Tensor], shares: list[torch.Tensor]) -> torch.Tensor:
    """The share-weighted mean of scalar metrics, in float32."""
    return functools.reduce(
        operator.add, [v.float() * w for v, w in zip(values, shares, strict=True)]
    )


def _loss_and_grads(
    loss_fn: LossFn,
    params: PyTree,
    batch: Batch,
    key: torch.Tensor,
    k: int,
    precision: Precision | None,
    method: str,
) -> tuple[torch.Tensor, Metrics, PyTree]:
    """Loss, aux and gradients over ``k`` micro-batches, weighted by each one's ``count``
    (counted tokens) when the loss reports it, so the result equals one batch k times larger."""

    def loss_of(p: PyTree, b: Batch, kk: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        return loss_fn(precision.cast(p) if precision else p, b, kk)

    grad_fn = value_and_grad(loss_of, method)
    micro = [batch] if k == 1 else _split(batch, k)
    keys = [key] if k == 1 else [random.fold_in(key, i) for i in range(k)]
    results = [grad_fn(params, b, kk) for b, kk in zip(micro, keys, strict=True)]
    if k == 1:
        (loss, aux), grads = results[0]
        return loss, dict(aux), grads
    shares = _shares([aux.get("count", torch.ones(())) for (_, aux), _ in results])
    grads = optree.tree_map(
        lambda *gs: sum(g * w.to(g.dtype) for g, w in zip(gs, shares, strict=True)),
        *[g for _, g in results],
    )
    loss = _mix([loss for (loss, _), _ in results], shares)
    aux = {
        name: (
            torch.stack([a[name] for (_, a), _ in results]).sum()
            if name == "count"
            else _mix([a[name] for (_, a), _ in results], shares)
        )
        for name in results[0][0][1]
    }
    return loss, aux, grads


def make_step(
    loss_fn: LossFn,
    optimizer: GradientTransformation,
    *,
    accumulate: int = 1,
    clip_norm: float | None = None,
    precision: Precision | None = None,
    donate: bool = False,
    grad_method: str = "autograd",
    skip_nonfinite: bool = False,
) -> Step:
    """A pure train step ``(state, batch) -> (state, metrics)``.

    * ``accumulate``: split the batch into that many micro-batches (the leading axis of every
      batch entry must divide), sum their gradients weighted by counted tokens;
    * ``clip_norm``: scale the gradient to at most that global norm (``clip_grad_norm_``'s rule);
    * ``precision``: a :class:`Precision` policy;
    * ``donate=True``: the step consumes the state it is given (do not read it again) and writes
      the new params and optimizer state into its buffers, with the optimizer's
      ``update_in_place`` where it has one (:func:`~functional_llm.optim.adamw`: the fused
      kernel of ``torch.optim.AdamW``). Eager only: a compiled step takes ``donate=False``.
      Without donation the step is pure; eagerly it runs the same kernel on copies it owns
      (:func:`~functional_llm.optim.update_and_apply`), so both give the same bits.
    * ``skip_nonfinite=True``: a step whose loss or gradient norm is not finite leaves the
      params and optimizer state as they were (Optax's ``apply_if_finite``), with no host sync;
      ``metrics["skipped"]`` is 1.0 for such a step. Without it a non-finite step is applied:
      watch for it with :func:`first_nonfinite`.

    metrics: ``loss``, the loss's aux (``nll``, ``accuracy``, ``count``, ...), ``grad_norm``
    (before clipping), ``tokens`` (= ``count`` when reported) and, when the optimizer injects it
    (:func:`~functional_llm.optim.inject_hyperparams`), ``learning_rate``, the one this step
    used.
    """
    if accumulate < 1:
        raise ValueError(f"make_step: accumulate must be >= 1, got {accumulate}")
    if clip_norm is not None and clip_norm <= 0:
        raise ValueError(f"make_step: clip_norm must be positive, got {clip_norm}")
    if skip_nonfinite and donate:
        raise ValueError("make_step: skip_nonfinite keeps the old state, so it cannot donate it")

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        key = random.fold_in(state.key, state.step)
        loss, aux, grads = _loss_and_grads(
            loss_fn, state.params, batch, key, accumulate, precision, grad_method
        )
        norm = global_norm(grads)
        if clip_norm is not None:
            factor = clip_factor(norm, clip_norm)
            grads = optree.tree_map(lambda g: g * factor.to(g.dtype), grads)
        params, opt_state = update_and_apply(
            optimizer, state.params, grads, state.opt_state, donate=donate
        )
        metrics = {**aux, "loss": loss, "grad_norm": norm}
        if skip_nonfinite:
            ok = torch.isfinite(loss) & torch.isfinite(norm)

            def keep_if_bad(new: Any, old: Any) -> Any:
                return torch.where(ok, new, old) if isinstance(new, torch.Tensor) else new

            params = optree.tree_map(keep_if_bad, params, state.params)
            opt_state = optree.tree_map(keep_if_bad, opt_state, state.opt_state)
            metrics["skipped"] = (~ok).float()
        if "count" in aux:
            metrics["tokens"] = aux["count"]
        if "learning_rate" in (injected := hyperparams(opt_state)):
            metrics["learning_rate"] = injected["learning_rate"]
        return TrainState(params, opt_state, state.step + 1, state.key), metrics

    return step


def first_nonfinite(
    first: torch.Tensor | None, step: int | torch.Tensor, metrics: Metrics
) -> torch.Tensor:
    """The first step number whose ``loss`` or ``grad_norm`` was not finite, or -1 while none
    was: ``first = first_nonfinite(first, t, metrics)`` after each step (``first=None`` to
    start). It is a tensor carried from step to step, so watching costs no host sync; read it
    (``int(first)``) where the run syncs anyway: when it logs, evaluates or checkpoints."""
    bad = ~torch.isfinite(metrics["loss"])
    if "grad_norm" in metrics:
        bad = bad | ~torch.isfinite(metrics["grad_norm"])
    device = metrics["loss"].device
    if first is None:
        first = torch.full((), -1, dtype=torch.int64, device=device)
    step = torch.as_tensor(step, dtype=torch.int64, device=device)
    return torch.where((first < 0) & bad, step, first)


def make_eval_step(
    loss_fn: LossFn, precision: Precision | None = None
) -> Callable[[PyTree, Batch], Metrics]:
    """``(params, batch) -> metrics``: the loss and its aux, no gradients, no dropout."""

    def eval_step(params: PyTree, batch: Batch) -> Metrics:
        with torch.no_grad():
            loss, aux = loss_fn(precision.cast(params) if precision else params, batch, None)
        return {**aux, "loss": loss}

    return eval_step


def evaluate(
    eval_step: Callable[[PyTree, Batch], Metrics], params: PyTree, batches: Any
) -> dict[str, float]:
    """Average ``eval_step`` over an iterable of batches, weighting by ``count`` when the loss
    reports it (so a token-mean loss comes out as the mean over all tokens)."""
    results = [eval_step(params, b) for b in batches]
    if not results:
        raise ValueError("evaluate: no batches")
    counts = [r.get("count", torch.ones(())) for r in results]
    shares = _shares(counts)
    out = {
        name: float(_mix([r[name] for r in results], shares))
        for name in results[0]
        if name != "count"
    }
    if "count" in results[0]:
        out["count"] = float(sum(float(c) for c in counts))
    return out
