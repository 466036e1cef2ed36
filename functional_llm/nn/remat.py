"""Rematerialisation (activation checkpointing): trade one more forward pass for memory.

``remat(fn)(*args)`` returns ``fn(*args)`` but keeps only ``fn``'s inputs (and the outputs of
the ops in ``save``) for the backward pass; everything else inside ``fn`` is recomputed when the
gradient needs it. Wrapping each Transformer block cuts the saved activations from ``L`` blocks'
worth of intermediates to the ``L`` block inputs plus one block's intermediates at a time.

It is ``torch.utils.checkpoint`` (non-reentrant) with a selective policy, which is what runs on
the library's gradient path (:func:`functional_llm.train.value_and_grad`, built on
``torch.autograd.grad``), eagerly and inside one compiled graph. Two details make the compiled
case work:

* the attention kernels are *saved*, not recomputed: their outputs are small (one ``(B, T, d)``
  tensor per layer) and the compiler refuses to recompute them, since their ops carry the
  ``nondeterministic_seeded`` tag (they could run dropout);
* randomness inside ``fn`` comes from explicit keys, so the recomputation draws the same dropout
  masks without saving and restoring the global RNG (``preserve_rng_state=False``).

``torch.func.grad`` refuses any checkpoint ("don't yet support saved tensor hooks",
pytorch#122729); that is why the library's gradient path is ``torch.autograd.grad``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

__all__ = ["ATTENTION_OPS", "remat"]

_aten = torch.ops.aten
ATTENTION_OPS = frozenset(
    getattr(_aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(_aten, name)
)


def _policy(save: frozenset, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE


def remat(fn: Callable[..., Any], save: frozenset = ATTENTION_OPS) -> Callable[..., Any]:
    """``fn`` with its intermediates recomputed in the backward pass, except the ops in
    ``save`` (by default the fused attention kernels). Outside a gradient computation it is
    ``fn`` itself."""
    context_fn = functools.partial(
        create_selective_checkpoint_contexts, functools.partial(_policy, save)
    )

    @functools.wraps(fn)
    def rematerialised(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        return checkpoint(
            fn,
            *args,
            use_reentrant=False,
            preserve_rng_state=False,
            context_fn=context_fn,
            **kwargs,
        )

    return rematerialised
