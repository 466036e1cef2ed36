"""Data transforms as pure functions of a key: MLM masking, NSP pairs, padding, and batch order
(shuffled, length-bucketed, resumable) for ``torch.utils.data``.

The same key gives the same masks, pairs and batches on any machine (counter-based Threefry
bits, :mod:`functional_llm.random`); nothing reads global RNG state, so a run resumed from
``(key, epoch, position)`` sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from functional_llm import random
from functional_llm.types import IGNORE

__all__ = ["BatchOrder", "mask_tokens", "nsp_pairs", "pad_batch"]

T = TypeVar("T")


def mask_tokens(
    key: torch.Tensor,
    tokens: torch.Tensor,
    *,
    protected: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int] = (),
    rate: float = 0.15,
    word_starts: torch.Tensor | None = None,
    mask_prob: float = 0.8,
    random_prob: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption: ``(inputs, labels)`` for ``tokens`` of any shape ``(..., T)``.

    Each token not ``protected`` (special tokens, padding) is selected with probability
    ``rate``; a selected token becomes ``mask_id`` with probability ``mask_prob``, a uniformly
    drawn non-special id with probability ``random_prob``, and stays itself otherwise (BERT's
    80/10/10). ``labels`` hold the original id at selected positions and ``IGNORE`` elsewhere.
    With ``word_starts`` (True at each word's first sub-word) whole words are selected: every
    sub-word follows the draw of its word's first piece.
    """
    if not 0.0 <= rate <= 1.0 or mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1:
        raise ValueError(
            f"mask_tokens: need 0 <= rate <= 1 and mask_prob + random_prob <= 1, got rate={rate}"
            f", mask_prob={mask_prob}, random_prob={random_prob}"
        )
    if protected.shape != tokens.shape:
        raise ValueError(
            f"mask_tokens: protected {tuple(protected.shape)} must match tokens "
            f"{tuple(tokens.shape)}"
        )
    k_select, k_action, k_random = random.split(key, 3)
    draw = random.uniform(k_select, tokens.shape)
    if word_starts is not None:
        at = torch.arange(tokens.shape[-1], device=tokens.device).expand(tokens.shape)
        first_piece = torch.where(word_starts.bool(), at, 0).cummax(-1).values
        draw = draw.gather(-1, first_piece)
    selected = (draw < rate) & ~protected.bool()

    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[list(special_ids)] = False
    pool = allowed.nonzero().squeeze(-1).to(tokens.device)
    replacement = pool[random.randint(k_random, tokens.shape, 0, len(pool))]
    action = random.uniform(k_action, tokens.shape)
    inputs = torch.where(selected & (action < mask_prob), mask_id, tokens)
    swap = selected & (action >= mask_prob) & (action < mask_prob + random_prob)
    inputs = torch.where(swap, replacement, inputs)
    labels = torch.where(selected, tokens, IGNORE)
    return inputs, labels


def nsp_pairs(
    key: torch.Tensor, documents: Sequence[Sequence[T]], random_prob: float = 0.5
) -> list[tuple[T, T, int]]:
    """Next-sentence pairs ``(a, b, label)`` from documents given as lists of segments.

    Every consecutive ``(segment_i, segment_{i+1})`` of a document gives one pair; with
    probability ``random_prob`` its ``b`` is replaced by a segment drawn uniformly from a
    *different* document. ``label`` is 0 when ``b`` truly follows ``a`` and 1 when it is random
    (BERT's order, as :func:`functional_llm.losses.nsp` expects).
    """
    nonempty = [d for d, doc in enumerate(documents) if doc]
    if len(nonempty) < 2:
        raise ValueError("nsp_pairs needs at least two non-empty documents to draw random b's")
    rank = {d: r for r, d in enumerate(nonempty)}
    firsts = [(d, i) for d, doc in enumerate(documents) for i in range(len(doc) - 1)]
    k_coin, k_doc, k_seg = random.split(key, 3)
    coins = random.bernoulli(k_coin, random_prob, (len(firsts),)).tolist()
    other_ranks = random.randint(k_doc, (len(firsts),), 0, len(nonempty) - 1).tolist()
    seg_draws = random.uniform(k_seg, (len(firsts),), dtype=torch.float64).tolist()
    pairs = []
    for (d, i), coin, r, u in zip(firsts, coins, other_ranks, seg_draws, strict=True):
        if not coin:
            pairs.append((documents[d][i], documents[d][i + 1], 0))
            continue
        other = documents[nonempty[r + (r >= rank[d])]]  # any non-empty document but d
        pairs.append((documents[d][i], other[int(u * len(other))], 1))
    return pairs


def pad_batch(
    examples: Sequence[Mapping[str, Any]],
    pad_values: Mapping[str, int] | None = None,
    *,
    length_key: str = "tokens",
    multiple_of: int = 1,
) -> dict[str, torch.Tensor]:
    """Collate examples into a batch padded to its longest sequence (dynamic padding).

    Fields with one value per example are stacked; 1-D fields are padded at the end with
    ``pad_values[name]`` (default 0; ``IGNORE`` for fields named ``labels``), to the longest
    length rounded up to ``multiple_of``. ``valid`` ``(B, T)`` is True at real tokens of
    ``length_key``. Usable as a ``DataLoader``'s ``collate_fn`` via ``functools.partial``.
    """
    if not examples:
        raise ValueError("pad_batch: no examples")
    pads = {"labels": IGNORE, **(pad_values or {})}
    lengths = [len(e[length_key]) for e in examples]
    width = -(-max(lengths) // multiple_of) * multiple_of
    batch: dict[str, torch.Tensor] = {}
    for name in examples[0]:
        values = [torch.as_tensor(np.asarray(e[name])) for e in examples]
        if values[0].ndim == 0:
            batch[name] = torch.stack(values)
            continue
        out = torch.full(
            (len(values), width, *values[0].shape[1:]), pads.get(name, 0), dtype=values[0].dtype
        )
        for row, v in enumerate(values):
            out[row, : len(v)] = v
        batch[name] = out
    batch["valid"] = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return batch


@dataclass(frozen=True)
class BatchOrder(torch.utils.data.Sampler):
    """The batches of one epoch as lists of dataset indices: a ``DataLoader`` ``batch_sampler``.

    Indices are shuffled by ``fold_in(key, epoch)`` (or kept in order with ``shuffle=False``).
    With ``lengths`` and ``bucket > 1``, each run of ``bucket * batch_size`` shuffled indices is
    sorted by length before it is cut into batches, and the batches are shuffled again: batches
    of similar lengths waste little padding, and their order stays random. Iteration starts at
    batch ``start``: a run resumed with the same ``(key, epoch)`` and ``start`` = the batches
    already consumed continues exactly where it stopped.
    """

    num_examples: int
    batch_size: int
    key: torch.Tensor
    epoch: int = 0
    start: int = 0
    shuffle: bool = True
    drop_last: bool = False
    lengths: Sequence[int] | None = None
    bucket: int = 1

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.bucket <= 0 or self.num_examples < 0:
            raise ValueError("BatchOrder: batch_size and bucket must be positive")
        if self.lengths is not None and len(self.lengths) != self.num_examples:
            raise ValueError(
                f"BatchOrder: {len(self.lengths)} lengths for {self.num_examples} examples"
            )
        if not 0 <= self.start <= len(self.batches()):
            raise ValueError(f"BatchOrder.start {self.start} is past the epoch's end")

    def batches(self) -> list[list[int]]:
        """All of the epoch's batches, ``start`` included or not."""
        k_order, k_batches = random.split(random.fold_in(self.key, self.epoch))
        n, size = self.num_examples, self.batch_size
        order = random.permutation(k_order, n).numpy() if self.shuffle else np.arange(n)
        if self.lengths is not None and self.bucket > 1:
            lengths = np.asarray(self.lengths)
            pool = self.bucket * size
            order = np.concatenate(
                [
                    chunk[np.argsort(lengths[chunk], kind="stable")]
                    for chunk in np.split(order, range(pool, n, pool))
                ]
                or [order]
            )
        batches = [order[i : i + size].tolist() for i in range(0, n, size)]
        if self.drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        if self.shuffle and self.lengths is not None and self.bucket > 1:
            batches = [batches[i] for i in random.permutation(k_batches, len(batches)).tolist()]
        return batches

    def __iter__(self):
        yield from self.batches()[self.start :]

    def __len__(self) -> int:
        return len(self.batches()) - self.start
