"""Generation with the cache: greedy decoding or keyed sampling, stopping on EOS.

``generate(model, params, prompt, valid, max_new_tokens=n)`` prefills the (left-padded) prompt
once and then runs one :func:`~functional_llm.generate.cache.decode_step` per new token::

    logits = logits_t / temperature                       temperature 0: argmax (greedy)
    logits = top_k(logits)                                 optional: keep the k largest
    token  ~ categorical(fold_in(key, t), logits)          t: the slot the token will fill

A row that has produced an EOS id is finished: its later tokens are ``pad_id`` and not valid,
and the loop ends when every row is finished. Prompts of different lengths go in one batch
left-padded (:func:`left_pad`); with greedy decoding each row comes out exactly as it would
alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from functional_llm import random
from functional_llm.generate.cache import decode_step, prefill
from functional_llm.nn.dropout import inference

__all__ = ["Generation", "generate", "left_pad"]


class Generation(NamedTuple):
    """``tokens (B, T0 + n)``: the prompt and what followed; ``valid``: which of them are real
    (prompt padding and the slots after a row's EOS are not)."""

    tokens: torch.Tensor
    valid: torch.Tensor


def left_pad(
    prompts: Sequence[Sequence[int] | torch.Tensor], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as ``(tokens, valid)``, ``(B, longest)``, padded on the
    left so that every row's last prompt token is in the last column."""
    rows = [torch.as_tensor(p, dtype=torch.int64).reshape(-1) for p in prompts]
    if not rows or min(len(r) for r in rows) == 0:
        raise ValueError("left_pad: give at least one prompt, each of at least one token")
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, width - len(r) :], valid[i, width - len(r) :] = r, True
    return tokens, valid


def generate(
    model: Any,
    params: Any,
    prompt: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    key: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int | None = None,
    max_len: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> Generation:
    """Extend ``prompt: (B, T0)`` by up to ``max_new_tokens`` tokens. ``temperature=0`` is
    greedy; otherwise tokens are sampled with ``key`` (required). ``max_len`` (default
    ``T0 + max_new_tokens``) sizes the cache; ``on_token`` receives each new ``(B,)`` column as
    it is produced (streaming)."""
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"generate: temperature ({temperature}) must be >= 0 and top_k "
                         f"({top_k}) >= 1")  # fmt: skip
    if temperature > 0 and key is None:
        raise ValueError("generate: sampling (temperature > 0) needs a key")
    eos = torch.tensor([] if eos_id is None else [eos_id] if isinstance(eos_id, int) else eos_id)
    pad = pad_id if pad_id is not None else (int(eos[0]) if len(eos) else 0)
    model = inference(model)  # no dropout while decoding
    batch, t0 = prompt.shape
    valid = torch.ones_like(prompt, dtype=torch.bool) if valid is None else valid.bool()
    columns, alive = [], torch.ones(batch, dtype=torch.bool)
    with torch.no_grad():
        logits, cache = prefill(
            model, params, prompt, valid, max_len=max_len or t0 + max_new_tokens
        )
        for t in range(max_new_tokens):
            nxt = _choose(logits[:, -1].float(), temperature, top_k, key, t0 + t)
            nxt = torch.where(alive, nxt, pad)
            columns.append((nxt, alive))
            if on_token is not None:
                on_token(nxt)
            alive = alive & ~torch.isin(nxt, eos)
            if not bool(alive.any()) or t + 1 == max_new_tokens:
                break
            logits, cache = decode_step(model, params, cache, nxt[:, None], donate=True)
    new_tokens = [c for c, _ in columns]
    new_valid = [a for _, a in columns]
    return Generation(
        torch.cat([prompt, *[c[:, None] for c in new_tokens]], dim=1),
        torch.cat([valid, *[a[:, None] for a in new_valid]], dim=1),
    )


def _choose(
    logits: torch.Tensor, temperature: float, top_k: int | None, key: Any, slot: int
) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return random.categorical(random.fold_in(key, slot), logits)
