"""Sampling from a decoder-only model, as a pure function of a key.

``sample(model, params, prompt, n, key)`` extends ``prompt: (B, T0)`` by ``n`` tokens::

    logits = model.apply(params, window)[:, -1] / temperature     last position, cropped window
    logits = top_k(logits)                                       optional: keep the k largest
    token  ~ categorical(fold_in(key, i), logits)                the same key, the same text

Each new token reruns the model on the last ``max_seq_len`` tokens (no KV cache yet): simple
and exact, fine for the short samples an experiment prints.
"""

from __future__ import annotations

from typing import Any

import torch

from functional_llm import random
from functional_llm.nn.dropout import inference

__all__ = ["sample"]


def sample(
    model: Any,
    params: Any,
    prompt: torch.Tensor,
    n: int,
    key: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """``prompt`` ``(B, T0)`` followed by ``n`` sampled tokens: ``(B, T0 + n)``.
    ``temperature=0`` is greedy decoding."""
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"sample: prompt must be (batch, length >= 1), got {tuple(prompt.shape)}")
    if temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError("sample: temperature must be >= 0 and top_k >= 1")
    window, model = model.config.max_seq_len, inference(model)  # no dropout while sampling
    tokens = prompt
    with torch.no_grad():
        for i in range(n):
            logits = model.apply(params, tokens[:, -window:])[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = random.categorical(random.fold_in(key, i), logits)
            tokens = torch.cat([tokens, nxt[:, None].to(tokens.dtype)], dim=1)
    return tokens
