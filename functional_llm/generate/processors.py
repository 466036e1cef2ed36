"""Logits processors: pure transforms of the next-token logits, composed with :func:`chain`.

A processor is a function ``(logits, context) -> logits`` on ``logits: (B, V)``; ``context``
holds every token so far (:class:`Context`). Removing a token sets its logit to ``-inf``.

* ``temperature(t)``: ``z / t``.
* ``top_k(k)``: keep the ``k`` largest logits (ties with the k-th kept too).
* ``top_p(p)`` (nucleus): in order of probability, keep the smallest prefix whose total
  probability reaches ``p``: token ``i`` stays when the probability of the tokens before it is
  below ``p`` (so at least one token always stays).
* ``min_p(p)``: keep tokens with probability at least ``p`` times the most likely one's.
* ``repetition_penalty(r)`` (CTRL; Hugging Face's rule): a token already in the context has its
  logit divided by ``r`` when positive, multiplied by ``r`` when negative.
* ``no_repeat_ngram(n)``: remove every token that would repeat an ``n``-gram of the context.
* ``bad_words(sequences)``: remove a sequence's last token where the context ends with the rest
  of it (a one-token sequence is always removed).
* ``forced_bos(id)`` / ``forced_eos(id, max_new_tokens)``: only ``id`` at the first / last new
  token.
* ``min_length(n, eos_ids)``: no EOS before ``n`` new tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

__all__ = [
    "Context",
    "Processor",
    "bad_words",
    "chain",
    "forced_bos",
    "forced_eos",
    "min_length",
    "min_p",
    "no_repeat_ngram",
    "repetition_penalty",
    "temperature",
    "top_k",
    "top_p",
]

NEG_INF = float("-inf")


class Context(NamedTuple):
    """What a processor may read: ``tokens (B, S)`` so far with ``valid (B, S)`` marking the
    real ones (prompt padding is not), and ``generated``, the number of new tokens so far."""

    tokens: torch.Tensor
    valid: torch.Tensor
    generated: int


Processor = Callable[[torch.Tensor, Context], torch.Tensor]


def chain(*processors: Processor) -> Processor:
    """Apply ``processors`` in order."""

    def run(logits: torch.Tensor, context: Context) -> torch.Tensor:
        for p in processors:
            logits = p(logits, context)
        return logits

    return run


def temperature(t: float) -> Processor:
    if not t > 0:
        raise ValueError(f"temperature must be > 0, got {t} (greedy decoding takes none)")
    return lambda logits, context: logits / t


def top_k(k: int) -> Processor:
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")

    def keep(logits: torch.Tensor, context: Context) -> torch.Tensor:
        if k >= logits.shape[-1]:
            return logits
        kth = logits.topk(k, dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth, NEG_INF)

    return keep


def top_p(p: float) -> Processor:
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p}")

    def keep(logits: torch.Tensor, context: Context) -> torch.Tensor:
        probs, order = logits.float().softmax(-1).sort(dim=-1, descending=True)
        before = probs.cumsum(-1) - probs  # probability of the more likely tokens
        drop_sorted = before >= p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        return logits.masked_fill(drop, NEG_INF)

    return keep


def min_p(p: float) -> Processor:
    if not 0 < p <= 1:
        raise ValueError(f"min_p must be in (0, 1], got {p}")

    def keep(logits: torch.Tensor, context: Context) -> torch.Tensor:
        probs = logits.float().softmax(-1)
        return logits.masked_fill(probs < p * probs.amax(-1, keepdim=True), NEG_INF)

    return keep


def repetition_penalty(r: float) -> Processor:
    if not r > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {r}")

    def penalise(logits: torch.Tensor, context: Context) -> torch.Tensor:
        real = context.valid.to(logits.dtype)  # count real occurrences only (not padding)
        seen = torch.zeros_like(logits).scatter_add(-1, context.tokens, real) > 0
        penalised = torch.where(logits > 0, logits / r, logits * r)
        return torch.where(seen, penalised, logits)

    return penalise


def _rows(context: Context) -> list[list[int]]:
    return [row[ok].tolist() for row, ok in zip(context.tokens, context.valid, strict=True)]


def no_repeat_ngram(n: int) -> Processor:
    if n < 1:
        raise ValueError(f"no_repeat_ngram must be >= 1, got {n}")

    def ban(logits: torch.Tensor, context: Context) -> torch.Tensor:
        banned = torch.zeros_like(logits, dtype=torch.bool)
        for b, seq in enumerate(_rows(context)):
            if len(seq) + 1 < n:
                continue
            prefix = tuple(seq[len(seq) - n + 1 :]) if n > 1 else ()
            for i in range(len(seq) - n + 1):
                if tuple(seq[i : i + n - 1]) == prefix:
                    banned[b, seq[i + n - 1]] = True
        return logits.masked_fill(banned, NEG_INF)

    return ban


def bad_words(sequences: Sequence[Sequence[int]]) -> Processor:
    sequences = [list(s) for s in sequences]
    if any(len(s) == 0 for s in sequences):
        raise ValueError("bad_words: every sequence needs at least one token")

    def ban(logits: torch.Tensor, context: Context) -> torch.Tensor:
        banned = torch.zeros_like(logits, dtype=torch.bool)
        for b, seq in enumerate(_rows(context)):
            for word in sequences:
                head = word[:-1]
                if not head or seq[len(seq) - len(head) :] == head:
                    banned[b, word[-1]] = True
        return logits.masked_fill(banned, NEG_INF)

    return ban


def _only(logits: torch.Tensor, token: int) -> torch.Tensor:
    forced = torch.full_like(logits, NEG_INF)
    forced[..., token] = 0.0
    return forced


def forced_bos(token: int) -> Processor:
    return lambda logits, context: _only(logits, token) if context.generated == 0 else logits


def forced_eos(token: int, max_new_tokens: int) -> Processor:
    def force(logits: torch.Tensor, context: Context) -> torch.Tensor:
        return _only(logits, token) if context.generated == max_new_tokens - 1 else logits

    return force


def min_length(n: int, eos_ids: int | Sequence[int]) -> Processor:
    ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)

    def hold(logits: torch.Tensor, context: Context) -> torch.Tensor:
        if context.generated >= n:
            return logits
        out = logits.clone()
        out[..., ids] = NEG_INF
        return out

    return hold
