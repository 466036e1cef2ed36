"""Language-model data: token files on disk and windows drawn from them by key.

A corpus is a flat array of token ids. :func:`write_tokens` stores it as raw ``uint16`` (or
``uint32`` for vocabularies over 65,536) like nanoGPT's ``train.bin``; :func:`read_tokens`
memory-maps it back, so a corpus larger than memory is read page by page, only where windows
fall.

Training windows are a pure function of a key: ``sample_windows(tokens, fold_in(key, step),
batch, block)`` draws ``batch`` random starts and returns ``inputs`` ``(batch, block)`` and
``targets`` (the same windows shifted by one). The data position is just the step, so a run
resumed from a checkpoint at step ``t`` continues with exactly the batches it would have seen.
:func:`eval_windows` covers a split once, in order, for an exact held-out loss;
:class:`TokenWindows` is the same data as a map-style ``torch.utils.data.Dataset``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from functional_llm import random
from functional_llm.files import write_atomic

__all__ = ["TokenWindows", "eval_windows", "read_tokens", "sample_windows", "write_tokens"]

Tokens = np.ndarray | torch.Tensor


def write_tokens(path: str | os.PathLike, ids: Tokens, vocab_size: int | None = None) -> Path:
    """Write ids as raw little-endian ``uint16`` (``uint32`` if ``vocab_size`` or the largest id
    needs it), atomically. Returns the path; read back with :func:`read_tokens`."""
    ids = ids.numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    top = int(ids.max(initial=0)) + 1 if vocab_size is None else vocab_size
    if ids.size and int(ids.min()) < 0:
        raise ValueError("write_tokens: token ids must be >= 0")
    dtype = np.dtype("<u2") if top <= 2**16 else np.dtype("<u4")
    return write_atomic(path, ids.astype(dtype).tobytes())


def read_tokens(path: str | os.PathLike, dtype: str = "uint16") -> np.ndarray:
    """Memory-map a token file written by :func:`write_tokens` (``dtype`` as written)."""
    dt = np.dtype(dtype).newbyteorder("<")
    size = Path(path).stat().st_size
    if size % dt.itemsize:
        raise ValueError(f"{path}: {size} bytes is not a whole number of {dtype} tokens")
    if size == 0:
        return np.zeros(0, dtype=dt)
    return np.memmap(path, dtype=dt, mode="r")


def _windows(tokens: Tokens, starts: np.ndarray, block: int) -> dict[str, torch.Tensor]:
    index = starts[:, None] + np.arange(block + 1)
    if isinstance(tokens, torch.Tensor):
        rows = tokens[torch.from_numpy(index)].long()
    else:
        rows = torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}


def sample_windows(
    tokens: Tokens, key: torch.Tensor, batch_size: int, block_size: int
) -> dict[str, torch.Tensor]:
    """``batch_size`` windows at uniformly random starts drawn from ``key``: ``inputs`` and
    ``targets`` ``(batch_size, block_size)`` int64, ``targets[t] = inputs[t + 1]``."""
    n = len(tokens)
    if n < block_size + 1:
        raise ValueError(f"sample_windows: {n} tokens cannot fill a window of {block_size} + 1")
    starts = random.randint(key, (batch_size,), 0, n - block_size).numpy()
    return _windows(tokens, starts, block_size)


def eval_windows(
    tokens: Tokens, batch_size: int, block_size: int, max_batches: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive non-overlapping windows covering ``tokens`` once (the tail shorter than a
    window is dropped), in batches of up to ``batch_size``: an exact held-out loss."""
    starts = np.arange(0, len(tokens) - block_size, block_size)
    for i, at in enumerate(range(0, len(starts), batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        yield _windows(tokens, starts[at : at + batch_size], block_size)


class TokenWindows(torch.utils.data.Dataset):
    """Map-style dataset: item ``i`` is the window starting at token ``i * stride``."""

    def __init__(self, tokens: Tokens, block_size: int, stride: int | None = None) -> None:
        self.tokens, self.block_size = tokens, block_size
        self.stride = stride or block_size
        if len(tokens) < block_size + 1:
            raise ValueError(f"TokenWindows: {len(tokens)} tokens < block_size + 1")

    def __len__(self) -> int:
        return (len(self.tokens) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"TokenWindows index {i} out of range [0, {len(self)})")
        one = _windows(self.tokens, np.array([i * self.stride]), self.block_size)
        return {name: x[0] for name, x in one.items()}
