"""The logit lens (nostalgebraist 2020): each layer's residual stream read out as if it were
the last, through the model's final norm and unembedding.

    logits_l = unembed(norm(h_l)),   h_0 = embed(tokens),  h_l = block_l(h_{l-1})

For a GPT, ``logit_lens`` gives ``(n_layers + 1, B, T, vocab)``; its last entry is ``apply``'s
logits. It runs the blocks one by one through the model's own public pieces (``embed``,
``block``, ``stack.finish``, ``logits``), so it needs no change to the model.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from functional_llm.nn import key_padding_mask
from functional_llm.nn.positions import positions_like

__all__ = ["layer_states", "logit_lens"]


def layer_states(
    model: Any, params: Any, tokens: torch.Tensor, valid: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """A GPT's residual stream before the first block and after each: ``n_layers + 1``
    tensors ``(B, T, d_model)`` (no final norm)."""
    if model.config.dropout:
        raise ValueError("layer_states: evaluate fl.nn.inference(model)")
    positions = positions_like(tokens)
    h = model.embed(params, tokens, positions)
    mask = None if valid is None else key_padding_mask(valid)
    states = [h]
    for block_params in params["blocks"]:
        h = cast(
            torch.Tensor,
            model.block.apply(block_params, h, mask=mask, causal=True, positions=positions),
        )
        states.append(h)
    return states


def logit_lens(
    model: Any, params: Any, tokens: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """``(n_layers + 1, B, T, vocab)``: every layer's state through the final norm and the
    unembedding."""
    states = layer_states(model, params, tokens, valid)
    return torch.stack([model.logits(params, model.stack.finish(params, h)) for h in states])
