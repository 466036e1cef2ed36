"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): save on one mesh, load on
another.

:func:`save` writes any state pytree (DTensors, plain tensors) as DCP's directory of shards
plus metadata: every rank writes its own shards, no rank gathers the whole state. :func:`load`
reads into the layout of ``like``: a state sharded on another mesh (tp=2 to dp=2), or plain
tensors in a single process without a process group (2 processes to 1); DCP reshards. Loading
reads tensors only (DCP's metadata is plain data), and ``like`` is not modified: the values
land in fresh buffers of its layout.

Saves are atomic: shards go to ``<path>.partial``, and the finished directory is renamed to
``path`` once every rank is done, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from functional_llm import tree
from functional_llm.types import PyTree

__all__ = ["load", "save"]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(path: str | os.PathLike, state: PyTree) -> Path:
    """Write ``state`` (a pytree of tensors and DTensors) to the directory ``path``. Every rank
    calls it; plain tensors count as replicated (rank 0's copy is written)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    if _rank() == 0 and partial.exists():
        shutil.rmtree(partial)
    _barrier()
    flat = tree.flatten(state)
    bad = {p: type(x).__name__ for p, x in flat.items() if not isinstance(x, torch.Tensor)}
    if bad:
        raise TypeError(f"parallel.checkpoint.save: leaves must be tensors; got {bad}")
    dcp.save(flat, checkpoint_id=str(partial))
    _barrier()
    if _rank() == 0:
        old = path.with_name(path.name + ".old")
        if path.exists():
            path.rename(old)
        partial.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    """A fresh buffer with ``x``'s layout (a DTensor keeps its mesh and placements)."""
    if isinstance(x, DTensor):
        return DTensor.from_local(
            torch.empty_like(x.to_local()),
            x.device_mesh,
            x.placements,
            shape=x.shape,
            stride=x.stride(),
        )
    return torch.empty_like(x)


def load(path: str | os.PathLike, like: PyTree) -> PyTree:
    """The state saved at ``path``, laid out as ``like`` (same structure; each leaf gives the
    dtype and, for DTensors, the mesh and placements to load into). A path or shape that does
    not match the checkpoint is an error naming it."""
    path = Path(path)
    if not (path / ".metadata").exists():
        raise FileNotFoundError(f"parallel.checkpoint.load: no DCP checkpoint at {path}")
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    flat = {p: _empty_like(x) for p, x in tree.flatten(like).items()}
    missing = sorted(set(flat) - set(saved))
    if missing:
        raise KeyError(f"parallel.checkpoint.load: {path} has no {missing}")
    for p, x in flat.items():
        size = getattr(saved[p], "size", None)
        if size is not None and tuple(size) != tuple(x.shape):
            raise ValueError(
                f"parallel.checkpoint.load: {p} is {tuple(size)} in {path}, but {tuple(x.shape)} "
                "in the state to load into"
            )
    dcp.load(flat, checkpoint_id=str(path))
    return tree.unflatten(flat, like)
