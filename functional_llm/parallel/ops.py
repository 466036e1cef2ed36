"""DTensor sharding strategies for the ops PyTorch ships without one.

CPU ``scaled_dot_product_attention`` lowers to ``aten._scaled_dot_product_flash_attention_for_cpu``,
which has no DTensor strategy: DTensor falls back to propagating through its decomposition,
which on a 2-rank mesh did not finish in minutes. Attention is independent per batch row and
per head, so the rule is simple: ``q, k, v: (B, H, T, Dh)`` (and the mask, where it has that
dim) sharded alike on ``B`` or on ``H`` give outputs sharded the same way; anything else is
replicated first. :func:`register` adds it to the engine: a :class:`~functional_llm.parallel.Plan`
calls it when it is made, so importing the library changes nothing in DTensor. Model code is
unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

__all__ = ["register"]

aten = torch.ops.aten


def _mask_placement(mask: Any, dim: int) -> Any:
    """The mask follows ``q``'s sharding on ``dim`` of ``(B, H, T, S)`` where it has that dim
    (masks broadcast from the right), else it is replicated."""
    if mask is None:
        return None
    own = dim - (4 - mask.ndim)
    return Shard(own) if own >= 0 and mask.shape[own] > 1 else Replicate()


def _strategies(q: Any, mask: Any, n_outputs: int, n_inputs: int) -> list[tuple[list, list]]:
    """Replicated, batch-sharded and head-sharded: every tensor argument sharded on the same
    dim (the logsumexp is ``(B, H, T)``, so it shares dims 0 and 1 with the others)."""
    out: list[tuple[list, list]] = [
        ([Replicate()] * n_outputs, [Replicate()] * n_inputs + [_rep(mask)])
    ]
    for dim in (0, 1):
        out.append(
            ([Shard(dim)] * n_outputs, [Shard(dim)] * n_inputs + [_mask_placement(mask, dim)])
        )
    return out


def _rep(mask: Any) -> Any:
    return None if mask is None else Replicate()


def _sdpa_cpu(
    query: Any,
    key: Any,
    value: Any,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    attn_mask: Any = None,
    scale: float | None = None,
) -> list[tuple[list, list]]:
    # inputs: query, key, value, dropout_p, is_causal, attn_mask, scale
    return [
        (outs, [*ins, None, None, m, None])
        for outs, (*ins, m) in _strategies(query, attn_mask, n_outputs=2, n_inputs=3)
    ]


def _sdpa_cpu_backward(
    grad_out: Any,
    query: Any,
    key: Any,
    value: Any,
    out: Any,
    logsumexp: Any,
    dropout_p: float,
    is_causal: bool,
    attn_mask: Any = None,
    scale: float | None = None,
) -> list[tuple[list, list]]:
    # inputs: grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, attn_mask, scale
    return [
        (outs, [*ins, None, None, m, None])
        for outs, (*ins, m) in _strategies(query, attn_mask, n_outputs=3, n_inputs=6)
    ]


_RULES = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: _sdpa_cpu,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: _sdpa_cpu_backward,
}


def register() -> None:
    """Give DTensor the CPU attention strategies above (idempotent: a rule already there is
    left as it is)."""
    known = DTensor._op_dispatcher.sharding_propagator.op_strategy_funcs
    for op, rule in _RULES.items():
        if op not in known:
            register_sharding(op)(rule)
