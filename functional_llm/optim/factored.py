"""Adafactor's pieces (Shazeer & Stern 2018): factored second moments and block-RMS scaling.

For a matrix gradient ``G`` (the two largest dims ``r`` and ``c``, both at least
``min_dim_size_to_factor``), only row and column means of ``G^2 + eps`` are kept::

    R = b R + (1 - b) mean_c(G^2 + eps)       C = b C + (1 - b) mean_r(G^2 + eps)
    V_hat = R C^T / mean(R)                   u = G / sqrt(V_hat)

with ``b = 1 - t^(-decay_rate)`` (0 on the first step). Other leaves keep the full ``V``.
Memory is ``O(r + c)`` instead of ``O(r c)`` per matrix.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import torch

from functional_llm.optim.base import (
    EmptyState,
    GradientTransformation,
    PyTree,
    counter,
    first_device,
    flat,
    unflat,
    up_to,
)

__all__ = [
    "FactoredState",
    "clip_by_block_rms",
    "scale_by_factored_rms",
    "scale_by_param_block_rms",
]


class FactoredState(NamedTuple):
    count: torch.Tensor
    v: PyTree  # per param: {"row": ..., "col": ...} when factored, else {"full": ...}


def _factored_dims(shape: torch.Size, factored: bool, min_dim: int) -> tuple[int, int] | None:
    """``(d_row, d_col)``: the second-largest and largest dims, if both are big enough."""
    if not factored or len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda d: (shape[d], d))
    if shape[order[-2]] < min_dim:
        return None
    return order[-2], order[-1]


def scale_by_factored_rms(
    factored: bool = True,
    decay_rate: float = 0.8,
    step_offset: int = 0,
    min_dim_size_to_factor: int = 128,
    epsilon: float = 1e-30,
) -> GradientTransformation:
    """Adafactor's direction ``g / sqrt(V_hat)`` (see the module docs)."""

    def init_leaf(p: torch.Tensor) -> dict[str, torch.Tensor]:
        dims = _factored_dims(p.shape, factored, min_dim_size_to_factor)
        if dims is None:
            return {"full": torch.zeros_like(p)}
        d_row, d_col = dims
        row = torch.zeros_like(p).mean(dim=d_col)  # reduce the largest dim: one value per row
        col = torch.zeros_like(p).mean(dim=d_row)
        return {"row": row, "col": col}

    def init(params: PyTree) -> FactoredState:
        leaves, spec = flat(params)
        return FactoredState(
            counter(first_device(params)), unflat(spec, [init_leaf(p) for p in leaves])
        )

    def update(
        updates: PyTree, state: FactoredState, params: PyTree | None = None, **_: Any
    ) -> tuple:
        g, spec = flat(updates)
        t = (state.count + 1 - step_offset).to(torch.float64)  # a scalar: float64 costs nothing
        decay = 1.0 - t.pow(-decay_rate)
        new_v, out = [], []
        moments = cast(list[dict[str, torch.Tensor]], spec.flatten_up_to(state.v))
        for x, v in zip(g, moments, strict=True):
            sq = x * x + epsilon
            dims = _factored_dims(x.shape, factored, min_dim_size_to_factor)
            if dims is None:
                full = decay * v["full"] + (1 - decay) * sq
                new_v.append({"full": full})
                out.append(x * full.rsqrt())
                continue
            d_row, d_col = dims
            row = decay * v["row"] + (1 - decay) * sq.mean(dim=d_col)
            col = decay * v["col"] + (1 - decay) * sq.mean(dim=d_row)
            reduced = d_row - 1 if d_row > d_col else d_row  # d_row's index once d_col is gone
            row_factor = (row / row.mean(dim=reduced, keepdim=True)).rsqrt()
            out.append(x * row_factor.unsqueeze(d_col) * col.rsqrt().unsqueeze(d_row))
            new_v.append({"row": row, "col": col})
        return unflat(spec, out), FactoredState(state.count + 1, unflat(spec, new_v))

    return GradientTransformation(init, update)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean().sqrt()


def clip_by_block_rms(threshold: float) -> GradientTransformation:
    """Per leaf, ``u = g / max(1, rms(g) / threshold)``: Adafactor's update clipping."""

    def update(updates: PyTree, state: EmptyState, params: PyTree | None = None, **_: Any) -> tuple:
        g, spec = flat(updates)
        return unflat(spec, [x / (_rms(x) / threshold).clamp(min=1.0) for x in g]), state

    return GradientTransformation(lambda params: EmptyState(), update)


def scale_by_param_block_rms(min_scale: float = 1e-3) -> GradientTransformation:
    """Per leaf, ``u = g * max(rms(p), min_scale)``: Adafactor's relative step size."""

    def update(updates: PyTree, state: EmptyState, params: PyTree | None = None, **_: Any) -> tuple:
        if params is None:
            raise ValueError(
                "scale_by_param_block_rms needs params: call update(grads, state, params)"
            )
        g, spec = flat(updates)
        p = up_to(spec, params)
        return unflat(
            spec, [x * _rms(w).clamp(min=min_scale) for x, w in zip(g, p, strict=True)]
        ), state

    return GradientTransformation(lambda params: EmptyState(), update)
