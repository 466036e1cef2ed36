"""Generation with the cache: greedy decoding or keyed sampling, stopping on EOS.

``generate(model, params, prompt, valid, max_new_tokens=n)`` prefills the (left-padded) prompt
once and then runs one :func:`~functional_llm.generate.cache.decode_step` per new token::

    logits = processors(logits_t, context)                 repetition penalty, n-gram bans, ...
    logits = top_p(top_k(logits / temperature))           temperature 0: argmax (greedy)
    token  ~ categorical(fold_in(key, s), logits)          s: the slot the token will fill

A row that has produced an EOS id (or met a ``stop`` criterion) is finished: its later tokens
are ``pad_id`` and not valid, and the loop ends when every row is finished. Prompts of
different lengths go in one batch left-padded (:func:`left_pad`); with greedy decoding each row
comes out exactly as it would alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from functional_llm import random
from functional_llm.generate.cache import KVCache, decode_step, encode, prefill
from functional_llm.generate.processors import Context, Processor, chain
from functional_llm.generate.processors import temperature as temperature_
from functional_llm.generate.processors import top_k as top_k_
from functional_llm.generate.processors import top_p as top_p_
from functional_llm.nn.dropout import inference

__all__ = [
    "Generation",
    "decoder",
    "generate",
    "left_pad",
    "start",
    "stop_sequences",
    "stop_strings",
]


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


Decode = Callable[[KVCache, torch.Tensor], tuple[torch.Tensor, KVCache]]
Stop = Callable[[Context], torch.Tensor]


def decoder(model: Any, params: Any, *, compile: bool = False) -> Decode:
    """``(cache, tokens) -> (logits, cache)`` for :func:`generate`: :func:`decode_step` on
    ``inference(model)``, donating the cache, or compiled once (``compile=True``, through
    :func:`functional_llm.train.compile`; keep the returned function to reuse the graph across
    generations of one shape)."""
    model = inference(model)
    if compile:
        from functional_llm.train import compile as compile_fn

        return compile_fn(lambda cache, tokens: decode_step(model, params, cache, tokens))
    return lambda cache, tokens: decode_step(model, params, cache, tokens, donate=True)


def stop_sequences(sequences: Sequence[Sequence[int]]) -> Stop:
    """A stop criterion: a row stops once its tokens end with one of ``sequences``."""
    seqs = [list(s) for s in sequences]

    def stop(context: Context) -> torch.Tensor:
        rows = [r[ok].tolist() for r, ok in zip(context.tokens, context.valid, strict=True)]
        return torch.tensor([any(r[len(r) - len(q) :] == q for q in seqs) for r in rows])

    return stop


def start(
    model: Any,
    params: Any,
    prompt: torch.Tensor,
    valid: torch.Tensor | None,
    src: torch.Tensor | None,
    src_valid: torch.Tensor | None,
    max_len: int,
) -> tuple[torch.Tensor, KVCache]:
    """The logits of the prompt's last position and the cache after it: :func:`prefill` for a
    decoder-only model; for an encoder-decoder model (``src`` given) :func:`encode` the source,
    then :func:`decode_step` the decoder's prompt (its start tokens, not padded)."""
    if src is None:
        if hasattr(model, "core"):
            raise ValueError("an encoder-decoder model decodes from a source: pass src=")
        return prefill(model, params, prompt, valid, max_len=max_len, last_only=True)
    if valid is not None and not bool(valid.all()):
        raise ValueError("an encoder-decoder model's decoder prompt is not padded: every row "
                         "starts with the same number of start tokens")  # fmt: skip
    cache = encode(model, params, src, src_valid, max_len=max_len)
    return decode_step(model, params, cache, prompt, donate=True, last_only=True)


def stop_strings(decode: Callable[[list[int]], str], strings: Sequence[str], skip: int) -> Stop:
    """A stop criterion: a row stops once the text of its tokens after the first ``skip``
    columns (the prompt), decoded with ``decode``, contains one of ``strings``."""
    if not strings or any(not s for s in strings):
        raise ValueError("stop_strings: give non-empty strings")

    def stop(context: Context) -> torch.Tensor:
        new = zip(context.tokens[:, skip:], context.valid[:, skip:], strict=True)
        texts = [decode(row[ok].tolist()) for row, ok in new]
        return torch.tensor([any(s in text for s in strings) for text in texts])

    return stop


def generate(
    model: Any,
    params: Any,
    prompt: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    src: torch.Tensor | None = None,
    src_valid: torch.Tensor | None = None,
    max_new_tokens: int,
    key: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    processors: Processor | None = None,
    eos_id: int | Sequence[int] | None = None,
    stop: Stop | None = None,
    pad_id: int | None = None,
    max_len: int | None = None,
    decode: Decode | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    rolling: bool = False,
) -> Generation:
    """Extend ``prompt: (B, T0)`` (left-padded where ``valid`` is False) by up to
    ``max_new_tokens`` tokens. For an encoder-decoder model, ``src: (B, S)`` (padded where
    ``src_valid`` is False) is the source and ``prompt`` the decoder's start tokens.

    ``processors`` transform the logits first; then ``temperature=0`` is greedy, and otherwise
    ``temperature``, ``top_k`` and ``top_p`` shape the distribution that tokens are sampled
    from with ``key`` (required): one key for the batch (the token for slot ``s`` uses
    ``fold_in(key, s)``), or one per row, ``(B, 2)``, which makes each row's text independent
    of the batch it is in. A row finishes at an EOS id or when ``stop`` says so; ``max_len``
    (default ``T0 + max_new_tokens``) sizes the cache; ``decode`` replaces the decode step
    (e.g. a compiled one from :func:`decoder`); ``on_token`` receives each new ``(B,)`` column
    as it is produced (streaming). ``rolling=True`` (decoder-only) generates past
    ``max_len``: when the cache is full, the newest ``max_len // 2`` tokens of each row are
    prefilled into a fresh one, so every token sees at least that many before it (not the
    exact sliding window of :func:`~functional_llm.generate.window.sample`, which reruns the
    whole window per token)."""
    if rolling and src is not None:
        raise ValueError("generate: rolling is for decoder-only models")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    sampling = [temperature_(temperature)] if temperature > 0 else []
    sampling += [top_k_(top_k)] if top_k is not None else []
    sampling += [top_p_(top_p)] if top_p is not None else []
    if temperature > 0 and key is None:
        raise ValueError("generate: sampling (temperature > 0) needs a key")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise ValueError("generate: top_k and top_p shape sampling; give a temperature > 0")
    process = chain(*([processors] if processors else []), *sampling)
    eos = torch.tensor([] if eos_id is None else [eos_id] if isinstance(eos_id, int) else eos_id)
    pad = pad_id if pad_id is not None else (int(eos[0]) if len(eos) else 0)
    model = inference(model)  # no dropout while decoding
    step = decode or decoder(model, params)
    batch, t0 = prompt.shape
    valid = torch.ones_like(prompt, dtype=torch.bool) if valid is None else valid.bool()
    tokens, real = prompt, valid
    alive = torch.ones(batch, dtype=torch.bool)
    with torch.no_grad():
        width = max_len or t0 + max_new_tokens
        if rolling and width < 2:
            raise ValueError(f"generate: rolling needs max_len >= 2, got {width}")
        logits, cache = start(model, params, prompt, valid, src, src_valid, width)
        for t in range(max_new_tokens):
            scores = process(logits[:, -1].float(), Context(tokens, real, t))
            nxt = scores.argmax(-1) if temperature == 0 else _draw(key, scores, t0 + t, real)
            nxt = torch.where(alive, nxt, pad)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            real = torch.cat([real, alive[:, None]], dim=1)
            if on_token is not None:
                on_token(nxt)
            alive = alive & ~torch.isin(nxt, eos)
            if stop is not None:
                alive = alive & ~stop(Context(tokens, real, t + 1))
            if not bool(alive.any()) or t + 1 == max_new_tokens:
                break
            if rolling and int(cache.index) == cache.max_len:  # full: keep the newest half
                recent, recent_valid = left_pad(
                    [row[ok][-(width // 2) :] for row, ok in zip(tokens, real, strict=True)], pad
                )  # (a finished row keeps its last real tokens; what it adds is discarded)
                logits, cache = prefill(
                    model, params, recent, recent_valid, max_len=width, last_only=True
                )
                continue
            logits, cache = step(cache, nxt[:, None].contiguous())
    return Generation(tokens, real)


def _draw(key: Any, scores: torch.Tensor, slot: int, real: torch.Tensor) -> torch.Tensor:
    """Sample each row's next token: with one key, from ``fold_in(key, slot)`` for the whole
    batch; with a key per row ``(B, 2)``, row ``b`` from ``fold_in(key[b], n_b)``, ``n_b`` its
    number of real tokens, so that a row draws the same tokens in any batch, with any
    padding."""
    if key.ndim == 1:
        return random.categorical(random.fold_in(key, slot), scores)
    if key.shape != (scores.shape[0], 2):
        raise ValueError(f"generate: key must be one key (2,) or one per row ({scores.shape[0]}, "
                         f"2), got {tuple(key.shape)}")  # fmt: skip
    draw = lambda k, n, z: random.categorical(random.fold_in(k, n), z)  # noqa: E731
    return torch.func.vmap(draw)(key, real.long().sum(-1), scores)
