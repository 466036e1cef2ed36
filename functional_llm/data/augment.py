"""Text augmentation as pure functions of a key: the same key gives the same noise, anywhere.

On token ids (1-D tensors), fairseq's noising and BART's infilling:

* :func:`token_dropout` drops each token with probability ``rate``;
* :func:`token_blank` replaces each with ``blank_id`` with probability ``rate``;
* :func:`token_replace` replaces each with a uniformly drawn id with probability ``rate``;
* :func:`local_shuffle` moves each token by fewer than ``k`` places (sort by ``i + U(0, k)``);
* :func:`span_infill` replaces spans of Poisson(``mean_span``) length, covering about ``rate``
  of the tokens, each by one ``mask_id`` (BART's text infilling).

``protected`` (a bool mask) marks tokens that are never dropped, replaced or moved (special
tokens). On words (lists of strings), EDA's operations without a thesaurus (Wei & Zou 2019):
:func:`random_swap`, :func:`random_deletion`, :func:`random_insertion` (of a word already in
the sentence), and :func:`eda`, which applies one of them per augmented copy. On sentences
and two translation models: :func:`back_translate` (there and back, sampled from a key).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from functional_llm import random
from functional_llm.types import Key

__all__ = [
    "back_translate",
    "eda",
    "local_shuffle",
    "random_deletion",
    "random_insertion",
    "random_swap",
    "span_infill",
    "token_blank",
    "token_dropout",
    "token_replace",
]


def _check_rate(name: str, rate: float) -> None:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name}: rate must be in [0, 1), got {rate}")


def _free(ids: torch.Tensor, protected: torch.Tensor | None) -> torch.Tensor:
    if ids.ndim != 1:
        raise ValueError(f"augmentation works on one sequence (1-D ids), got {tuple(ids.shape)}")
    if protected is None:
        return torch.ones_like(ids, dtype=torch.bool)
    if protected.shape != ids.shape:
        raise ValueError(f"protected {tuple(protected.shape)} must match ids {tuple(ids.shape)}")
    return ~protected


def token_dropout(
    key: Key, ids: torch.Tensor, rate: float, protected: torch.Tensor | None = None
) -> torch.Tensor:
    """``ids`` without the tokens dropped (each with probability ``rate``)."""
    _check_rate("token_dropout", rate)
    drop = random.bernoulli(key, rate, ids.shape) & _free(ids, protected)
    return ids[~drop]


def token_blank(
    key: Key, ids: torch.Tensor, rate: float, blank_id: int, protected: torch.Tensor | None = None
) -> torch.Tensor:
    """``ids`` with each free token replaced by ``blank_id`` with probability ``rate``."""
    _check_rate("token_blank", rate)
    hit = random.bernoulli(key, rate, ids.shape) & _free(ids, protected)
    return torch.where(hit, torch.full_like(ids, blank_id), ids)


def token_replace(
    key: Key, ids: torch.Tensor, rate: float, vocab_size: int, protected: torch.Tensor | None = None
) -> torch.Tensor:
    """``ids`` with each free token replaced by a uniform draw from ``[0, vocab_size)`` with
    probability ``rate``."""
    _check_rate("token_replace", rate)
    k_hit, k_new = random.split(key)
    hit = random.bernoulli(k_hit, rate, ids.shape) & _free(ids, protected)
    return torch.where(hit, random.randint(k_new, ids.shape, 0, vocab_size).to(ids.dtype), ids)


def local_shuffle(
    key: Key, ids: torch.Tensor, k: float, protected: torch.Tensor | None = None
) -> torch.Tensor:
    """fairseq's word shuffle: token ``i`` goes to the rank of ``i + U(0, k)``, so it moves by
    fewer than ``k`` places; protected tokens keep their positions."""
    if k < 1:
        raise ValueError(f"local_shuffle: k must be >= 1, got {k}")
    free = _free(ids, protected)
    noise = random.uniform(key, ids.shape, dtype=torch.float64) * k
    keys = torch.arange(len(ids), dtype=torch.float64) + noise
    idx = free.nonzero().squeeze(-1)
    out = ids.clone()
    out[idx] = ids[idx[torch.argsort(keys[idx], stable=True)]]
    return out


def span_infill(
    key: Key,
    ids: torch.Tensor,
    rate: float,
    mask_id: int,
    mean_span: float = 3.0,
    protected: torch.Tensor | None = None,
) -> torch.Tensor:
    """BART's text infilling: spans of Poisson(``mean_span``) length (stopping at a protected
    token), each replaced by a single ``mask_id`` (a zero-length span inserts one), covering
    about ``rate`` of the tokens. A span starts at each token not inside one with probability
    ``p = rate / (mu - rate (mu + e^-mu - 1))``, which makes the expected covered fraction
    ``p mu / (1 - p + p (mu + e^-mu))`` equal ``rate``."""
    _check_rate("span_infill", rate)
    if mean_span <= 0:
        raise ValueError(f"span_infill: mean_span must be positive, got {mean_span}")
    free = _free(ids, protected).tolist()
    k_start, k_len = random.split(key)
    mu = mean_span
    p_start = rate / (mu - rate * (mu + math.exp(-mu) - 1))
    starts = random.bernoulli(k_start, p_start, ids.shape).tolist()
    lengths = (
        torch.poisson(torch.full(ids.shape, float(mean_span)), generator=_generator(k_len))
        .long()
        .tolist()
    )
    out, i = [], 0
    values = ids.tolist()
    while i < len(values):
        if free[i] and starts[i]:
            out.append(mask_id)
            end = i
            while end < len(values) and end - i < lengths[i] and free[end]:
                end += 1
            if end == i:  # a zero-length span inserts a mask before the token
                out.append(values[i])
                end = i + 1
            i = end
        else:
            out.append(values[i])
            i += 1
    return torch.tensor(out, dtype=ids.dtype)


def _generator(key: Key) -> torch.Generator:
    """A torch generator seeded from ``key`` (for draws the Threefry module does not offer)."""
    seed = int(random.bits(key, ()).item()) & (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def random_swap(key: Key, words: list[str], n: int = 1) -> list[str]:
    """``words`` with ``n`` random pairs of positions swapped."""
    out = list(words)
    if len(out) < 2:
        return out
    picks = random.randint(key, (n, 2), 0, len(out)).tolist()
    for a, b in picks:
        out[a], out[b] = out[b], out[a]
    return out


def random_deletion(key: Key, words: list[str], rate: float = 0.1) -> list[str]:
    """``words`` without each word with probability ``rate`` (one word always stays)."""
    _check_rate("random_deletion", rate)
    if len(words) <= 1:
        return list(words)
    keep = random.bernoulli(key, 1.0 - rate, (len(words),)).tolist()
    kept = [w for w, k in zip(words, keep, strict=True) if k]
    return kept or [words[int(random.randint(random.fold_in(key, 1), (), 0, len(words)))]]


def random_insertion(key: Key, words: list[str], n: int = 1) -> list[str]:
    """``words`` with ``n`` copies of words from the sentence inserted at random places
    (EDA's insertion, with the sentence's own words instead of synonyms)."""
    out = list(words)
    if not out:
        return out
    for i, k in enumerate(random.split(key, n)):
        k_word, k_at = random.split(random.fold_in(k, i))
        word = out[int(random.randint(k_word, (), 0, len(out)))]
        out.insert(int(random.randint(k_at, (), 0, len(out) + 1)), word)
    return out


def eda(key: Key, words: list[str], copies: int = 4, alpha: float = 0.1) -> list[list[str]]:
    """``copies`` augmented versions of ``words``: each applies one of swap, deletion and
    insertion, touching about ``alpha`` of the words (at least one)."""
    n = max(1, round(alpha * len(words)))
    ops = (
        lambda k: random_swap(k, words, n),
        lambda k: random_deletion(k, words, alpha),
        lambda k: random_insertion(k, words, n),
    )
    out = []
    for i, k in enumerate(random.split(key, copies)):
        op = int(random.randint(random.fold_in(k, 7), (), 0, len(ops)))
        out.append(ops[op](random.fold_in(k, i)))
    return out


def back_translate(
    key: Key,
    forward: tuple[Any, Any],
    backward: tuple[Any, Any],
    src: torch.Tensor,
    src_valid: torch.Tensor | None = None,
    *,
    start_id: int,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paraphrases of ``src: (B, S)`` (right-padded where ``src_valid`` is False): translated
    into a pivot language by ``forward = (model, params)``, then back by ``backward`` (Sennrich
    et al. 2016), both encoder-decoder models whose decoders start from ``start_id`` and stop
    at ``eos_id``. Returns ``(tokens, valid)`` in ``src``'s form: right-padded with ``pad_id``,
    without start or EOS tokens.

    ``temperature > 0`` samples each translation (Edunov et al. 2018 found sampled back-
    translations the more useful noise) with its own key per row, so a row's paraphrase
    depends on ``key`` and the row alone, not on the batch; ``temperature=0`` is greedy. A
    translation that is empty becomes the single token ``eos_id`` before it is read back."""
    if src.ndim != 2:
        raise ValueError(f"back_translate: src must be (batch, length), got {tuple(src.shape)}")
    keys = random.split(key, 2 * src.shape[0]).reshape(2, src.shape[0], -1)
    options = {"start_id": start_id, "eos_id": eos_id, "pad_id": pad_id, "top_p": top_p,
               "max_new_tokens": max_new_tokens, "temperature": temperature}  # fmt: skip
    pivot, pivot_valid = _translate(forward, src, src_valid, keys[0], **options)
    return _translate(backward, pivot, pivot_valid, keys[1], **options)


def _translate(
    translator: tuple[Any, Any],
    src: torch.Tensor,
    src_valid: torch.Tensor | None,
    keys: torch.Tensor,
    *,
    start_id: int,
    eos_id: int,
    pad_id: int,
    **sampling: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    from functional_llm.generate import generate  # decoding needs the models; data must not

    model, params = translator
    start = torch.full((src.shape[0], 1), start_id, dtype=torch.int64, device=src.device)
    keyed = keys if sampling["temperature"] > 0 else None
    out = generate(model, params, start, src=src, src_valid=src_valid, key=keyed,
                   eos_id=eos_id, pad_id=pad_id, **sampling)  # fmt: skip
    rows = [r[ok][1:] for r, ok in zip(out.tokens, out.valid, strict=True)]
    rows = [r[:-1] if len(r) and r[-1] == eos_id else r for r in rows]
    rows = [r if len(r) else torch.tensor([eos_id], device=src.device) for r in rows]
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.int64, device=src.device)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    lengths = torch.tensor([len(r) for r in rows], device=src.device)
    return tokens, torch.arange(width, device=src.device) < lengths[:, None]
