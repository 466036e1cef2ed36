"""Sampling from a decoder-only model, as a pure function of a key.

``sample(model, params, prompt, n, key)`` extends ``prompt: (B, T0)`` by ``n`` tokens::

    logits = model.apply(params, window)[:, -1] / temperature     last position, cropped window
    logits = top_k(logits)                                       optional: keep the k largest
    token  ~ categorical(fold_in(key, i), logits)                the same key, the same text

Each new token reruns the model on the last ``max_seq_len`` tokens, without a cache: the
exact sliding window, for texts longer than the model's context (``generate.generate`` with
the key/value cache is the fast way; its ``rolling=True`` keeps at least half a window).
"""

from __future__ import annotations

from typing import Any

import torch

from functional_llm import random
from functional_llm.generate import processors
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
    warpers = [] if temperature == 0 else [processors.temperature(temperature)]
    shape = processors.chain(*warpers, *([processors.top_k(top_k)] if top_k is not None else []))
    context = processors.Context(prompt, torch.ones_like(prompt, dtype=torch.bool), 0)  # unread
    tokens = prompt
    with torch.no_grad():
        for i in range(n):
            logits = model.apply(params, tokens[:, -window:])[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                logits = shape(logits, context)
                nxt = random.categorical(random.fold_in(key, i), logits)
            tokens = torch.cat([tokens, nxt[:, None].to(tokens.dtype)], dim=1)
    return tokens
