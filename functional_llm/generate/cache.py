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

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import optree
import torch

from functional_llm.models.inputs import check_ids, check_like
from functional_llm.nn.module import Params

__all__ = ["KVCache", "decode_step", "encode", "init_cache", "prefill", "reorder"]


class KVCache(NamedTuple):
    """Keys and values per layer, ``(B, kv_heads, L, head_dim)`` each; ``valid: (B, L)`` the
    slots holding real tokens; ``index: ()`` the next slot to write; ``position: (B,)`` each
    row's next position (its number of real tokens so far). For an encoder-decoder model also
    the cross-attention keys and values of the encoded source, ``(B, heads, S, head_dim)`` per
    layer (computed once, by :func:`encode`), and the source's ``memory_valid: (B, S)``; with a
    copy head (``copy_source``) ``copy``: its keys of the memory ``(B, S, d_model)`` and the
    source ids ``(B, S)``."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    valid: torch.Tensor
    index: torch.Tensor
    position: torch.Tensor
    memory_k: tuple[torch.Tensor, ...] = ()
    memory_v: tuple[torch.Tensor, ...] = ()
    memory_valid: torch.Tensor | None = None
    copy: tuple[torch.Tensor, ...] = ()

    @property
    def max_len(self) -> int:
        return self.valid.shape[-1]


class _Decoder(NamedTuple):
    """What decoding needs of a model: its decoder blocks and how to embed and unembed."""

    embed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (tokens, positions) -> h
    blocks: list[Params]
    block: Any
    finish: Callable[[torch.Tensor], torch.Tensor]  # the final norm
    logits: Callable[[torch.Tensor, KVCache], torch.Tensor]  # (final states, cache) -> logits
    vocab_size: int


def _decoder_block(model: Any) -> Any:
    return model.core.decoder.block if hasattr(model, "core") else model.block


def _decoder(model: Any, p: Params) -> _Decoder:
    """The decoder of a decoder-only model (``GPT``) or of the encoder-decoder
    ``Transformer`` (its target side)."""
    if hasattr(model, "core"):  # the encoder-decoder Transformer
        dec = model.core.decoder
        return _Decoder(
            lambda t, pos: model.embed(p, "tgt", t, None, pos), p["decoder"]["blocks"],
            dec.block, lambda h: dec.finish(p["decoder"], h),
            lambda h, cache: model.output(p, h, cache.copy, cache.memory_valid),
            model.config.tgt_vocab_size,
        )  # fmt: skip
    return _Decoder(
        lambda t, pos: model.embed(p, t, pos), p["blocks"], model.block,
        lambda h: model.stack.finish(p, h), lambda h, _: model.logits(p, h),
        model.config.vocab_size,
    )  # fmt: skip


def init_cache(model: Any, batch: int, max_len: int, device: Any = None) -> KVCache:
    """An empty cache for ``batch`` rows of up to ``max_len`` tokens (prompt and new ones)."""
    c = model.config
    if not 1 <= max_len <= c.max_seq_len:
        raise ValueError(f"init_cache: max_len ({max_len}) must be in [1, max_seq_len = "
                         f"{c.max_seq_len}]")  # fmt: skip
    attn = _decoder_block(model)._attention()
    layers = c.num_decoder_layers if hasattr(model, "core") else c.n_layers
    shape = (batch, attn.kv_heads, max_len, attn.dim_per_head)
    zeros = lambda: torch.zeros(shape, dtype=c.dtype, device=device)  # noqa: E731
    return KVCache(
        k=[zeros() for _ in range(layers)],
        v=[zeros() for _ in range(layers)],
        valid=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
        index=torch.zeros((), dtype=torch.int64, device=device),
        position=torch.zeros(batch, dtype=torch.int64, device=device),
    )


def encode(
    model: Any,
    params: Params,
    src: torch.Tensor,
    src_valid: torch.Tensor | None = None,
    *,
    max_len: int,
) -> KVCache:
    """The cache to decode from for an encoder-decoder model: the encoder runs once over
    ``src: (B, S)`` (padding where ``src_valid`` is False), each decoder layer's
    cross-attention keys and values are computed from its output once, and the decoder's
    self-attention cache of ``max_len`` slots starts empty. Feed the decoder's start tokens
    with :func:`decode_step`."""
    if not hasattr(model, "core"):
        raise TypeError("encode: an encoder-decoder model (Transformer) is needed; a "
                        "decoder-only model starts with prefill")  # fmt: skip
    if src.ndim != 2 or src.shape[1] == 0:
        raise ValueError(f"encode: src must be (batch, length >= 1), got {tuple(src.shape)}")
    memory = model.encode(params, src, src_valid=src_valid)
    cross = model.core.decoder.block._attention(cross=True)
    kv = [cross.memory_kv(block["cross"], memory) for block in params["decoder"]["blocks"]]
    valid = torch.ones_like(src, dtype=torch.bool) if src_valid is None else src_valid.bool()
    return init_cache(model, src.shape[0], max_len, src.device)._replace(
        memory_k=tuple(k for k, _ in kv), memory_v=tuple(v for _, v in kv), memory_valid=valid,
        copy=model.copy_context(params, memory, src),
    )  # fmt: skip


def prefill(
    model: Any,
    params: Params,
    tokens: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    max_len: int,
    last_only: bool = False,
) -> tuple[torch.Tensor, KVCache]:
    """Run the prompt ``tokens: (B, T0)`` (left-padded where ``valid`` is False) through a
    decoder-only model into a fresh cache of ``max_len`` slots: the logits ``(B, T0, vocab)``
    and the cache (``last_only``: the last position's logits only). (An encoder-decoder model
    starts with :func:`encode`.)"""
    if hasattr(model, "core"):
        raise TypeError("prefill is for decoder-only models; an encoder-decoder model starts "
                        "with encode(model, params, src, src_valid, max_len=...)")  # fmt: skip
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"prefill: tokens must be (batch, length >= 1), got {tuple(tokens.shape)}")
    if tokens.shape[1] > max_len:
        raise ValueError(f"prefill: the prompt has {tokens.shape[1]} tokens, more than "
                         f"max_len ({max_len})")  # fmt: skip
    check_like("valid", valid, "tokens", tokens)
    cache = init_cache(model, tokens.shape[0], max_len, tokens.device)
    valid = torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid.bool()
    return _step(model, params, cache, tokens, valid, donate=True, last_only=last_only)


def decode_step(
    model: Any,
    params: Params,
    cache: KVCache,
    tokens: torch.Tensor,
    *,
    donate: bool = False,
    last_only: bool = False,
) -> tuple[torch.Tensor, KVCache]:
    """The logits ``(B, T, vocab)`` for the next ``tokens: (B, T)`` (usually ``T = 1``) after
    everything in ``cache``, and the cache with them. ``donate=True`` consumes ``cache`` (its
    buffers are written in place; do not read it again). ``last_only=True`` unembeds the last
    position only (``(B, 1, vocab)``: all that generation needs, and the vocabulary projection
    is the costliest matmul of a small model)."""
    if tokens.ndim != 2 or tokens.shape[0] != cache.valid.shape[0]:
        raise ValueError(f"decode_step: tokens must be (batch = {cache.valid.shape[0]}, T), got "
                         f"{tuple(tokens.shape)}")  # fmt: skip
    valid = torch.ones_like(tokens, dtype=torch.bool)
    return _step(model, params, cache, tokens, valid, donate=donate, last_only=last_only)


def reorder(cache: KVCache, rows: torch.Tensor) -> KVCache:
    """The cache whose row ``i`` is ``cache``'s row ``rows[i]`` (beam search follows its
    beams with it)."""
    rest = cast(Any, cache._replace(index=None))  # the slot index is shared by every row
    picked = cast(KVCache, optree.tree_map(lambda x: x.index_select(0, rows), rest))
    return picked._replace(index=cache.index)


def _step(
    model: Any,
    params: Params,
    cache: KVCache,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    *,
    donate: bool,
    last_only: bool = False,
) -> tuple[torch.Tensor, KVCache]:
    dec = _decoder(model, params)
    check_ids("tokens", tokens, None, dec.vocab_size)
    heads = dec.block._attention().kv_heads
    if len(cache.k) != len(dec.blocks) or cache.k[0].shape[1:2] != (heads,):
        raise ValueError(
            f"the cache has {len(cache.k)} layers of {tuple(cache.k[0].shape)} keys; this model "
            f"has {len(dec.blocks)} layers of {heads} kv heads"
        )
    if hasattr(model, "core") != bool(cache.memory_k):
        kind = "an encoder-decoder" if cache.memory_k else "a decoder-only"
        raise ValueError(f"this cache is for {kind} model; start from prefill or encode")
    t, width = tokens.shape[1], cache.max_len
    if not torch.compiler.is_compiling() and int(cache.index) + t > width:
        raise ValueError(f"the cache is full: {int(cache.index)} of {width} slots used, "
                         f"{t} more asked for (raise max_len)")  # fmt: skip
    slots = cache.index + torch.arange(t, device=tokens.device)  # (T,)
    positions = cache.position[:, None] + valid.long().cumsum(-1) - valid.long()
    slot_valid = cache.valid.index_copy(1, slots, valid)
    seen = torch.arange(width, device=tokens.device)[None, :] <= slots[:, None]  # (T, L) causal
    mask = (slot_valid[:, None, :] & seen)[:, None]  # (B, 1, T, L)
    memory_mask = None if cache.memory_valid is None else cache.memory_valid[:, None, None, :]
    h = dec.embed(tokens, positions)
    ks, vs = [], []
    for i, (block_params, k, v) in enumerate(zip(dec.blocks, cache.k, cache.v, strict=True)):
        memory_kv = (cache.memory_k[i], cache.memory_v[i]) if cache.memory_k else None
        h, (k, v) = dec.block.apply_cached(
            block_params, h, (k, v), slots=slots, mask=mask, positions=positions, donate=donate,
            memory_kv=memory_kv, memory_mask=memory_mask,
        )  # fmt: skip
        ks.append(k)
        vs.append(v)
    logits = dec.logits(dec.finish(h[:, -1:] if last_only else h), cache)
    new = cache._replace(
        k=ks, v=vs, valid=slot_valid, index=cache.index + t,
        position=cache.position + valid.long().sum(-1),
    )  # fmt: skip
    return logits, new
