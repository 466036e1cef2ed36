"""A sharding plan: a mesh, rules and a model's logical axes, applied to pytrees and steps.

::

    mesh = parallel.make_mesh({"dp": 2, "tp": 2})
    plan = parallel.Plan(mesh, parallel.Rules({"batch": "dp", "heads": "tp", "mlp": "tp"}),
                         model.axes())
    state = plan.shard(train.init_state(params, opt, key))    # params and moments: DTensors
    step = plan.step(train.make_step(plan.loss(loss_fn), opt))
    state, metrics = step(state, plan.shard_batch(batch))
    params = plan.gather(state.params)                         # full tensors on every rank

The step is the single-process step, unchanged: DTensor propagates the placements through
every op and inserts the collectives (the gradient of a replicated parameter used on a
batch-sharded input is reduced over ``dp``; a row-parallel matmul's partial sums are
all-reduced over ``tp``). :meth:`Plan.loss` adds what the step cannot know: params stored
sharded for FSDP are gathered to their compute placements before use, and the gradient of
that gather is a reduce-scatter (the SimpleFSDP recipe, arXiv 2411.00284); a replicated
param's gradient over a sharded batch is all-reduced once there, not at each later use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import optree
import torch
from torch._functorch import config as functorch_config
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.experimental import implicit_replication

from functional_llm import tree
from functional_llm.parallel import ops
from functional_llm.parallel.mesh import mesh_shape
from functional_llm.parallel.rules import Rules, as_mesh_axes, placements
from functional_llm.types import PyTree

__all__ = ["ACTIVATION_AXES", "Plan", "local"]

ACTIVATION_AXES = ("batch",)  # logical axes of activations and batches rather than params


def local(tree_: PyTree) -> PyTree:
    """Every DTensor leaf as a full plain tensor (``full_tensor()``), other leaves as they are."""
    return optree.tree_map(lambda x: x.full_tensor() if isinstance(x, DTensor) else x, tree_)


@dataclass(frozen=True)
class Plan:
    """``axes``: the model's ``axes()`` (each param's logical axis names)."""

    mesh: DeviceMesh
    rules: Rules
    axes: PyTree
    _flat_axes: dict[str, tuple] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ops.register()  # DTensor's CPU attention strategy, from the first plan on
        shape = mesh_shape(self.mesh)
        self.rules.check_mesh(shape)
        flat = tree.flatten_axes(self.axes)
        known = {a for names in flat.values() for a in names if a is not None}
        for where in ("rules", "params"):
            for logical in getattr(self.rules, where):
                if logical not in known and logical not in ACTIVATION_AXES:
                    raise ValueError(
                        f"Rules.{where} names logical axis {logical!r}, which no parameter has "
                        f"and is not an activation axis {ACTIVATION_AXES}; the model's axes are "
                        f"{sorted(known)}"
                    )
        object.__setattr__(self, "_flat_axes", flat)

    # -- placements ----------------------------------------------------------------------------
    def _placements(self, path: str, x: torch.Tensor, rules: Mapping) -> tuple[Placement, ...]:
        axes = self._flat_axes.get(path)
        if axes is None:
            raise KeyError(f"Plan: params have {path!r}, which the model's axes() do not name")
        return placements(path, x.shape, axes, mesh_shape(self.mesh), rules, self.rules.strict)

    def param_placements(self, params: PyTree) -> dict[str, tuple[Placement, ...]]:
        """``{path: placements}`` as params are stored (``rules`` overridden by ``params``)."""
        rules = self.rules.for_params()
        return {p: self._placements(p, x, rules) for p, x in tree.flatten(params).items()}

    def compute_placements(self, params: PyTree) -> dict[str, tuple[Placement, ...]]:
        """``{path: placements}`` as params are used in the step (the activation ``rules``)."""
        return {
            p: self._placements(p, x, self.rules.rules) for p, x in tree.flatten(params).items()
        }

    # -- pytrees -------------------------------------------------------------------------------
    def shard(self, state: PyTree) -> PyTree:
        """Any pytree holding the params (params alone, a ``TrainState``, optimizer state) as
        DTensors. A leaf whose path ends in a param's path and has its shape (``params.x``,
        ``opt_state.0.mu.x``) gets that param's placements; other floating tensors with dims
        are replicated; scalars (step, count) and integer leaves stay plain tensors, identical
        on every rank. Plain leaves are split locally (no communication): every rank must hold
        the same full values, as it does after ``init`` from the same key."""
        flat = tree.flatten(state)
        param_paths = self._param_paths(flat)
        out = {}
        for path, x in flat.items():
            if not isinstance(x, torch.Tensor) or isinstance(x, DTensor):
                out[path] = x
                continue
            match = _param_of(path, param_paths)
            if match is not None and tuple(x.shape) == param_paths[match][0]:
                out[path] = self._distribute(x, param_paths[match][1])
            elif x.is_floating_point() and x.ndim > 0:
                out[path] = self._distribute(x, (Replicate(),) * self.mesh.ndim)
            else:
                out[path] = x
        return tree.unflatten(out, state)

    def _param_paths(self, flat: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], tuple]]:
        """``{param path: (shape, stored placements)}`` for the params found in ``flat``."""
        rules = self.rules.for_params()
        found = {}
        for param in self._flat_axes:
            for path, x in flat.items():
                if isinstance(x, torch.Tensor) and (path == param or path.endswith("." + param)):
                    found[param] = (tuple(x.shape), self._placements(param, x, rules))
                    break
        return found

    def _distribute(self, x: torch.Tensor, where: tuple[Placement, ...]) -> DTensor:
        return distribute_tensor(x, self.mesh, list(where), src_data_rank=None)

    @staticmethod
    def gather(state: PyTree) -> PyTree:
        """DTensor leaves back to full plain tensors (an all-gather where sharded)."""
        return local(state)

    def shard_batch(self, batch: Mapping[str, torch.Tensor]) -> dict[str, DTensor]:
        """Every entry sharded on its leading (batch) dim by the ``batch`` rule (replicated
        when there is none), split locally: each rank holds the full batch. The batch size
        must divide."""
        rule, shape = self.rules.rules.get("batch"), mesh_shape(self.mesh)
        out = {}
        for name, x in batch.items():
            axes = ("batch",) + (None,) * (x.ndim - 1)
            where = placements(f"batch[{name!r}]", x.shape, axes, shape, {"batch": rule})
            out[name] = self._distribute(x, where)
        return out

    # -- steps ---------------------------------------------------------------------------------
    def loss(self, loss_fn: Callable[..., Any]) -> Callable[..., Any]:
        """``loss_fn`` with each param brought to its compute placements on the way in, so
        that its gradient comes back in the stored placements, reduced once in the backward
        pass: FSDP's all-gather (gradient: a reduce-scatter), or for a param stored as used an
        identity whose gradient is made the param's placements (a replicated param's partial
        gradients all-reduced over ``dp`` once, not again at every later use)."""

        names = list(mesh_shape(self.mesh))
        batch_dims = {names.index(m) for m in as_mesh_axes(self.rules.rules.get("batch"))}
        if not batch_dims and not self.rules.params:
            return loss_fn  # every param used as stored, no partial gradients to settle

        def placed(params: PyTree, *args: Any, **kwargs: Any) -> Any:
            where = self.compute_placements(params)
            flat = {
                p: _to(x, self.mesh, where[p], batch_dims) for p, x in tree.flatten(params).items()
            }
            return loss_fn(tree.unflatten(flat, params), *args, **kwargs)

        return placed

    @staticmethod
    def _contexts() -> Any:
        """What the step runs under. ``implicit_replication``: plain tensors made inside the
        model (positions, causal masks, dropout masks from a key) count as replicated. And no
        AOTAutograd cache: in torch 2.13 a compiled tensor-parallel step loaded from a warm
        cache computed other losses than the same step compiled fresh (3.4725 against eager's
        3.4774 on its first step; tests/test_parallel_spawned.py compiles twice to check);
        the FX graph cache stays on."""
        stack = ExitStack()
        stack.enter_context(implicit_replication())
        stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
        return stack

    def step(self, step: Callable[..., tuple[Any, Any]]) -> Callable[..., tuple[Any, Any]]:
        """A train step ``(state, batch) -> (state, metrics)`` run sharded: the state stays
        DTensors, the metrics come back as plain tensors."""

        def sharded(state: Any, batch: Any) -> tuple[Any, Any]:
            with self._contexts():
                state, metrics = step(state, batch)
            return state, local(metrics)

        return sharded

    def run(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Any function (an eval step, a forward) run sharded, its outputs as plain tensors."""

        def sharded(*args: Any, **kwargs: Any) -> Any:
            with self._contexts():
                return local(fn(*args, **kwargs))

        return sharded

    # -- inspection ----------------------------------------------------------------------------
    def table(self, params: PyTree) -> str:
        """One line per parameter: shape, logical axes, stored (and compute) placements, and
        the local shard's shape; totals per rank at the end."""
        stored, compute = self.param_placements(params), self.compute_placements(params)
        sizes = mesh_shape(self.mesh)
        rows = [("param", "shape", "axes", "placements", "in step", "local shape")]
        per_rank = 0
        for path, x in tree.flatten(params).items():
            shape = _local_shape(x.shape, stored[path], list(sizes.values()))
            per_rank += math.prod(shape) * x.element_size()
            rows.append(
                (
                    path,
                    str(tuple(x.shape)),
                    str(self._flat_axes[path]),
                    _fmt(stored[path], sizes),
                    "" if compute[path] == stored[path] else _fmt(compute[path], sizes),
                    str(shape),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        total = sum(x.numel() * x.element_size() for x in tree.leaves(params))
        lines.append(
            f"mesh {sizes}: {per_rank / 2**20:.2f} MiB of {total / 2**20:.2f} MiB per rank"
        )
        return "\n".join(lines)


def _to(x: Any, mesh: DeviceMesh, where: tuple[Placement, ...], batch_dims: set[int]) -> Any:
    """``x`` in placements ``where``; its gradient in ``x``'s own placements. The identity
    case matters only where ``x`` is replicated over a mesh dim that shards the batch: there
    its gradient is partial, and made replicated here it is all-reduced once. Elsewhere the
    gradient already has ``x``'s placements, and ``x`` passes through untouched."""
    if not isinstance(x, DTensor):
        return x
    if tuple(x.placements) != tuple(where):
        return x.redistribute(mesh, where)
    if not any(isinstance(x.placements[d], Replicate) for d in batch_dims):
        return x
    return DTensor.from_local(
        x.to_local(grad_placements=x.placements),
        mesh,
        where,
        run_check=False,
        shape=x.shape,
        stride=x.stride(),
    )


def _param_of(path: str, params: Mapping[str, Any]) -> str | None:
    """The longest param path that ``path`` ends with (``opt_state.0.mu.blocks.0.q.w``)."""
    best = None
    for p in params:
        if (path == p or path.endswith("." + p)) and (best is None or len(p) > len(best)):
            best = p
    return best


def _local_shape(shape: torch.Size, where: tuple[Placement, ...], sizes: list[int]) -> tuple:
    out = list(shape)
    for p, n in zip(where, sizes, strict=True):
        if isinstance(p, Shard):
            out[p.dim] //= n
    return tuple(out)


def _fmt(where: tuple[Placement, ...], sizes: Mapping[str, int]) -> str:
    """``dp:S(0) tp:R`` style."""
    return " ".join(
        f"{name}:{f'S({p.dim})' if isinstance(p, Shard) else 'R'}"
        for name, p in zip(sizes, where, strict=True)
    )
