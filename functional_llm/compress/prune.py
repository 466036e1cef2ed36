"""Pruning, unstructured and structured.

**Unstructured** (magnitude): the fraction ``s`` of each chosen weight with the smallest
``|w|`` is masked. Masks are a tree kept beside the params; :func:`keep_pruned` wraps an
optimizer so that masked weights stay exactly zero (their updates are masked too), and
:func:`sparsity_at` is the gradual schedule of Zhu & Gupta (2017):
``s_t = s_f + (s_0 - s_f) (1 - (t - t_0) / (t_1 - t_0))^3``.

**Structured** (attention heads, MLP neurons): each layer keeps its ``keep`` most important
heads (or neurons) and the params physically shrink, with a config to match, so the pruned
model is smaller and faster. Importance is the weights' magnitude (the L2 norm of what a head
writes and reads: its ``q``, ``k``, ``v`` slices and its rows of ``o``), or, given gradients,
the first-order Taylor estimate ``|sum w g|`` of the loss change when the head is removed
(Michel et al. 2019; Molchanov et al. 2019).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from functional_llm import tree
from functional_llm.compress.quantize import DEFAULT_TARGETS
from functional_llm.optim.base import GradientTransformation

__all__ = [
    "apply_masks",
    "head_importance",
    "keep_pruned",
    "magnitude_masks",
    "neuron_importance",
    "prune_heads",
    "prune_neurons",
    "sparsity_at",
]


def magnitude_masks(
    params: Any, sparsity: float, include: tuple[str, ...] = DEFAULT_TARGETS
) -> Any:
    """A tree of params' structure: for the weights (2+ dims) matching ``include``, True where
    the weight survives (all but the ``sparsity`` fraction of smallest magnitude, per weight);
    every other leaf all True."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"magnitude_masks: sparsity must be in [0, 1), got {sparsity}")
    tree.require_matches("magnitude_masks", tree.paths(params), include)

    def mask(path: str, w: torch.Tensor) -> torch.Tensor:
        if w.ndim < 2 or not tree.matches(path, *include):
            return torch.ones_like(w, dtype=torch.bool)
        k = int(sparsity * w.numel())
        if k == 0:
            return torch.ones_like(w, dtype=torch.bool)
        threshold = w.abs().flatten().kthvalue(k).values
        return w.abs() > threshold

    return tree.map_with_path(mask, params)


def apply_masks(params: Any, masks: Any) -> Any:
    """``params * masks``: the pruned weights zeroed."""
    return tree.map(lambda w, m: w * m.to(w.dtype), params, masks)


def keep_pruned(inner: GradientTransformation, masks: Any) -> GradientTransformation:
    """``inner`` whose updates are masked, so that pruned weights (zero) stay zero: AdamW's
    weight decay and momentum never revive them. Change ``masks`` by rebuilding the wrapper
    (a gradual schedule does so at each pruning step)."""

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple:
        updates, state = inner.update(updates, state, params, **extra)
        return apply_masks(updates, masks), state

    return GradientTransformation(inner.init, update)


def sparsity_at(step: int, final: float, begin: int, end: int, initial: float = 0.0) -> float:
    """Zhu & Gupta's cubic schedule: ``initial`` until ``begin``, ``final`` from ``end``."""
    if not begin < end:
        raise ValueError(f"sparsity_at: begin ({begin}) must be before end ({end})")
    frac = min(max((step - begin) / (end - begin), 0.0), 1.0)
    return final + (initial - final) * (1 - frac) ** 3


def _attention_blocks(model: Any, params: Any) -> list[dict]:
    c = model.config
    if c.n_kv_heads not in (None, c.n_heads):
        raise ValueError("prune_heads: grouped-query attention shares kv heads between query "
                         "heads; prune multi-head attention models")  # fmt: skip
    return params["blocks"]


def head_importance(model: Any, params: Any, grads: Any = None) -> torch.Tensor:
    """``(layers, heads)`` importance: the L2 norm of each head's weights, or with ``grads``
    (same structure) the Taylor estimate ``|sum_head w g|``."""
    scores = []
    for i, block in enumerate(_attention_blocks(model, params)):
        attn = block["attn"]
        g = None if grads is None else grads["blocks"][i]["attn"]
        per_head = torch.zeros(model.config.n_heads)
        for name in "qkv":  # (d, H, hd): heads on axis 1
            w = attn[name]["w"]
            per_head += _score(w, None if g is None else g[name]["w"], (0, 2))
        per_head += _score(attn["o"]["w"], None if g is None else g["o"]["w"], (1, 2))
        scores.append(per_head)
    return torch.stack(scores)


def _score(w: torch.Tensor, g: torch.Tensor | None, dims: tuple[int, ...]) -> torch.Tensor:
    if g is None:
        return w.detach().float().pow(2).sum(dims).sqrt()
    return (w * g).detach().float().sum(dims).abs()


def neuron_importance(model: Any, params: Any, grads: Any = None) -> torch.Tensor:
    """``(layers, d_ff)`` importance of each MLP neuron: the norm of its ``up`` (and ``gate``)
    column and its ``down`` row, or the Taylor estimate with ``grads``."""
    scores = []
    for i, block in enumerate(params["blocks"]):
        mlp = block["mlp"]
        g = None if grads is None else grads["blocks"][i]["mlp"]
        per = _score(mlp["down"]["w"], None if g is None else g["down"]["w"], (1,))
        for name in ("up", "gate"):
            if name in mlp:
                per = per + _score(mlp[name]["w"], None if g is None else g[name]["w"], (0,))
        scores.append(per)
    return torch.stack(scores)


def _keep_indices(scores: torch.Tensor, keep: int, what: str, total: int) -> torch.Tensor:
    if not 1 <= keep <= total:
        raise ValueError(
            f"{what}: keep must be in [1, {total}] (the layer has {total}), got {keep}"
        )
    return scores.topk(keep, dim=-1).indices.sort(dim=-1).values


def prune_heads(
    model: Any, params: Any, keep: int, importance: torch.Tensor | None = None
) -> tuple[Any, Any]:
    """``(smaller model, its params)``: every layer keeps its ``keep`` most important heads
    (``importance``: ``(layers, heads)``, default :func:`head_importance`). The new config has
    ``n_heads = keep`` and the same ``head_dim``; the outputs equal the original model's with
    the other heads' weights zeroed."""
    c = model.config
    scores = head_importance(model, params) if importance is None else importance
    chosen = _keep_indices(scores, keep, "prune_heads", c.n_heads)
    blocks = []
    for block, idx in zip(_attention_blocks(model, params), chosen, strict=True):
        attn = dict(block["attn"])
        for name in "qkv":
            attn[name] = {k: v.index_select(-2, idx) if k == "w" else v.index_select(0, idx)
                          for k, v in attn[name].items()}  # fmt: skip
        attn["o"] = {**attn["o"], "w": attn["o"]["w"].index_select(0, idx)}
        blocks.append({**block, "attn": attn})
    config = dataclasses.replace(c, n_heads=keep, head_dim=c.dim_per_head)
    return type(model)(config), {**params, "blocks": blocks}


def prune_neurons(
    model: Any, params: Any, keep: int, importance: torch.Tensor | None = None
) -> tuple[Any, Any]:
    """``(smaller model, its params)``: every MLP keeps its ``keep`` most important neurons;
    the new config has ``d_ff = keep``."""
    c = model.config
    scores = neuron_importance(model, params) if importance is None else importance
    chosen = _keep_indices(scores, keep, "prune_neurons", c.ffn_dim)
    blocks = []
    for block, idx in zip(params["blocks"], chosen, strict=True):
        mlp = dict(block["mlp"])
        for name in ("up", "gate"):
            if name in mlp:
                mlp[name] = {k: v.index_select(-1, idx) for k, v in mlp[name].items()}
        mlp["down"] = {**mlp["down"], "w": mlp["down"]["w"].index_select(0, idx)}
        blocks.append({**block, "mlp": mlp})
    return type(model)(dataclasses.replace(c, d_ff=keep)), {**params, "blocks": blocks}
