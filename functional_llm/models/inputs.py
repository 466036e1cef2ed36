"""Checks of model inputs, with errors that name the argument and both shapes."""

from __future__ import annotations

import torch

__all__ = ["check_ids", "check_like"]


def check_ids(name: str, ids: torch.Tensor, max_len: int | None = None) -> None:
    """``ids`` must be an integer tensor ``(..., T)`` with ``T <= max_len``."""
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


def check_like(name: str, x: torch.Tensor | None, ids_name: str, ids: torch.Tensor) -> None:
    """An optional per-token input (``valid``, ``token_types``) must have the ids' shape."""
    if x is not None and x.shape != ids.shape:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} but {ids_name} has shape {tuple(ids.shape)}"
        )
