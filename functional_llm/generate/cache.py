"""Incremental decoding of decoder-only models with a key/value cache held as a value.

A :class:`KVCache` holds, per layer, the keys and values of every slot ``(B, kv_heads, L,
head_dim)``, preallocated to ``L = max_len``; which slots hold real tokens; the next slot to
write (the same for every row: prompts are left-padded); and each row's next position. It goes
into :func:`decode_step` and a new one comes out::

    logits, cache = prefill(model, params, prompt, valid, max_len=64)   # (B, T0, V)
    logits, cache = decode_step(model, params, cache, next_tokens)      # (B, 1, V)

Row ``b``'s query at slot ``s`` sees the slots ``s' <= s`` that hold real tokens, and its
position is the number of real tokens before it, so a left-padded prompt decodes exactly as it
would alone. Every function is pure: the cache passed in is not modified, unless the caller
donates it (``donate=True``), and then the new keys and values are written into its buffers.
Shapes are static (``L`` is fixed, the slot index is a tensor), so a compiled
:func:`decode_step` compiles once for a whole generation.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import torch

from functional_llm.models.inputs import check_ids, check_like
from functional_llm.nn.module import Params

__all__ = ["KVCache", "decode_step", "init_cache", "prefill", "reorder"]


class KVCache(NamedTuple):
    """Keys and values per layer, ``(B, kv_heads, L, head_dim)`` each; ``valid: (B, L)`` the
    slots holding real tokens; ``index: ()`` the next slot to write; ``position: (B,)`` each
    row's next position (its number of real tokens so far)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    valid: torch.Tensor
    index: torch.Tensor
    position: torch.Tensor

    @property
    def max_len(self) -> int:
        return self.valid.shape[-1]


def init_cache(model: Any, batch: int, max_len: int, device: Any = None) -> KVCache:
    """An empty cache for ``batch`` rows of up to ``max_len`` tokens (prompt and new ones)."""
    c = model.config
    if not 1 <= max_len <= c.max_seq_len:
        raise ValueError(f"init_cache: max_len ({max_len}) must be in [1, max_seq_len = "
                         f"{c.max_seq_len}]")  # fmt: skip
    attn = model.block._attention()
    shape = (batch, attn.kv_heads, max_len, attn.dim_per_head)
    zeros = lambda: torch.zeros(shape, dtype=c.dtype, device=device)  # noqa: E731
    return KVCache(
        k=[zeros() for _ in range(c.n_layers)],
        v=[zeros() for _ in range(c.n_layers)],
        valid=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
        index=torch.zeros((), dtype=torch.int64, device=device),
        position=torch.zeros(batch, dtype=torch.int64, device=device),
    )


def prefill(
    model: Any,
    params: Params,
    tokens: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    max_len: int,
) -> tuple[torch.Tensor, KVCache]:
    """Run the prompt ``tokens: (B, T0)`` (left-padded where ``valid`` is False) through the
    model into a fresh cache of ``max_len`` slots: the logits ``(B, T0, vocab)`` and the cache."""
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"prefill: tokens must be (batch, length >= 1), got {tuple(tokens.shape)}")
    if tokens.shape[1] > max_len:
        raise ValueError(f"prefill: the prompt has {tokens.shape[1]} tokens, more than "
                         f"max_len ({max_len})")  # fmt: skip
    check_like("valid", valid, "tokens", tokens)
    cache = init_cache(model, tokens.shape[0], max_len, tokens.device)
    valid = torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid.bool()
    return _step(model, params, cache, tokens, valid, donate=True)  # the fresh cache is ours


def decode_step(
    model: Any,
    params: Params,
    cache: KVCache,
    tokens: torch.Tensor,
    *,
    donate: bool = False,
) -> tuple[torch.Tensor, KVCache]:
    """The logits ``(B, T, vocab)`` for the next ``tokens: (B, T)`` (usually ``T = 1``) after
    everything in ``cache``, and the cache with them. ``donate=True`` consumes ``cache`` (its
    buffers are written in place; do not read it again)."""
    if tokens.ndim != 2 or tokens.shape[0] != cache.valid.shape[0]:
        raise ValueError(f"decode_step: tokens must be (batch = {cache.valid.shape[0]}, T), got "
                         f"{tuple(tokens.shape)}")  # fmt: skip
    valid = torch.ones_like(tokens, dtype=torch.bool)
    return _step(model, params, cache, tokens, valid, donate=donate)


def reorder(cache: KVCache, rows: torch.Tensor) -> KVCache:
    """The cache whose row ``i`` is ``cache``'s row ``rows[i]`` (beam search follows its
    beams with it)."""
    pick = lambda x: x.index_select(0, rows)  # noqa: E731
    return KVCache([pick(k) for k in cache.k], [pick(v) for v in cache.v], pick(cache.valid),
                   cache.index, pick(cache.position))  # fmt: skip


def _step(
    model: Any,
    params: Params,
    cache: KVCache,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    *,
    donate: bool,
) -> tuple[torch.Tensor, KVCache]:
    c = model.config
    check_ids("tokens", tokens, None, c.vocab_size)
    if len(cache.k) != c.n_layers or cache.k[0].shape[1:2] != (model.block._attention().kv_heads,):
        raise ValueError(
            f"the cache has {len(cache.k)} layers of {tuple(cache.k[0].shape)} keys; this model "
            f"has {c.n_layers} layers of {model.block._attention().kv_heads} kv heads"
        )
    t, width = tokens.shape[1], cache.max_len
    if not torch.compiler.is_compiling() and int(cache.index) + t > width:
        raise ValueError(f"the cache is full: {int(cache.index)} of {width} slots used, "
                         f"{t} more asked for (raise max_len)")  # fmt: skip
    slots = cache.index + torch.arange(t, device=tokens.device)  # (T,)
    positions = cache.position[:, None] + valid.long().cumsum(-1) - valid.long()
    slot_valid = cache.valid.index_copy(1, slots, valid)
    seen = torch.arange(width, device=tokens.device)[None, :] <= slots[:, None]  # (T, L) causal
    mask = (slot_valid[:, None, :] & seen)[:, None]  # (B, 1, T, L)
    h = model.embed(params, tokens, positions)
    ks, vs = [], []
    for block_params, k, v in zip(params["blocks"], cache.k, cache.v, strict=True):
        h, (k, v) = model.block.apply_cached(
            block_params, h, (k, v), slots=slots, mask=mask, positions=positions, donate=donate
        )
        ks.append(k)
        vs.append(v)
    logits = model.logits(params, model.stack.finish(params, h))
    new = KVCache(ks, vs, slot_valid, cache.index + t, cache.position + valid.long().sum(-1))
    return cast(torch.Tensor, logits), new
