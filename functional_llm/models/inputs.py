"""Checks of model inputs, with errors that name the argument and both shapes."""

from __future__ import annotations

import torch

__all__ = ["check_ids", "check_like", "check_range"]


def check_ids(
    name: str, ids: torch.Tensor, max_len: int | None = None, vocab_size: int | None = None
) -> None:
    """``ids`` must be an integer tensor ``(..., T)`` with ``T <= max_len``, and (eagerly, see
    :func:`check_range`) every id in ``[0, vocab_size)``."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.ndim < 1:
        raise ValueError(f"{name} must have shape (..., T), got a scalar")
    if max_len is not None and ids.shape[-1] > max_len:
        raise ValueError(
            f"{name} has length {ids.shape[-1]} (shape {tuple(ids.shape)}) > max_seq_len {max_len}"
        )
    if vocab_size is not None:
        check_range(name, ids, vocab_size)


def check_like(name: str, x: torch.Tensor | None, ids_name: str, ids: torch.Tensor) -> None:
    """An optional per-token input (``valid``, ``token_types``) must have the ids' shape."""
    if x is not None and x.shape != ids.shape:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} but {ids_name} has shape {tuple(ids.shape)}"
        )


def check_range(name: str, ids: torch.Tensor, size: int, *, ignore: int | None = None) -> None:
    """Every id in ``[0, size)`` (or equal to ``ignore``), else a ``ValueError`` naming ``name``,
    the first bad id and its position. An index of -1 would silently read the last row.

    Checked eagerly, on CPU tensors: it reads values, so it is skipped while compiling or under
    ``torch.func`` transforms (shapes only) and for tensor subclasses (DTensor); on an
    accelerator it is an asynchronous assert, which costs no host sync."""
    if (
        torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or type(ids) is not torch.Tensor
        or ids.is_meta
        or ids.numel() == 0
    ):
        return
    allowed = f"[0, {size})" + ("" if ignore is None else f" or {ignore} (ignored)")
    counted = ids if ignore is None else torch.where(ids == ignore, 0, ids)
    low, high = torch.aminmax(counted)  # one pass over the ids
    if ids.device.type != "cpu":
        torch._assert_async((low >= 0) & (high < size), f"{name} holds ids outside {allowed}")
        return
    if not (int(low) >= 0 and int(high) < size):
        ok = (counted >= 0) & (counted < size)
        at = tuple(int(i) for i in (~ok).nonzero()[0])
        raise ValueError(
            f"{name} holds the id {int(ids[at])} at position {at} (shape {tuple(ids.shape)}); "
            f"ids must be in {allowed}"
        )
