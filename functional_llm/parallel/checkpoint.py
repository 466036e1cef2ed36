"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): save on one mesh, load on
another.

:func:`save` writes any state pytree (DTensors, plain tensors) as DCP's directory of shards
plus metadata: every rank writes its own shards, no rank gathers the whole state. :func:`load`
reads into the layout of ``like``: a state sharded on another mesh (tp=2 to dp=2), or plain
tensors in a single process without a process group (2 processes to 1); DCP reshards. Loading
``like`` is not modified: the values land in fresh buffers of its layout.

* **Atomic.** Shards go to ``<path>.partial``, and the finished directory is renamed to
  ``path`` once every rank is done, so a crash mid-save leaves the previous checkpoint intact.
* **Checked.** Beside DCP's files, :func:`save` writes ``manifest.json``: every leaf's global
  shape and dtype, and a CRC-32 of every file of the checkpoint. :func:`load` verifies the
  checksums before reading anything else, and refuses a ``like`` whose shapes or dtypes differ
  (no silent cast).
* **No code runs on load.** DCP describes a checkpoint in a pickle (``.metadata``); it is read
  with an unpickler that admits only DCP's own metadata classes, torch sizes, dtypes and
  layouts, and paths, so a crafted file cannot execute anything. The shards are read by
  DCP with ``torch.load(weights_only=True)``, torch's restricted unpickler, after their
  checksums passed.

Every failure is a :class:`~functional_llm.checkpoint.CheckpointError` naming the path.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import zlib
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.tensor import DTensor

from functional_llm import tree
from functional_llm.checkpoint import CheckpointError
from functional_llm.types import PyTree

FORMAT = "functional_llm.sharded/1"
MANIFEST = "manifest.json"

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
        _write_manifest(partial, flat)
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


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_manifest(directory: Path, flat: dict[str, torch.Tensor]) -> None:
    manifest = {
        "format": FORMAT,
        "tensors": {
            p: {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
            for p, x in flat.items()
        },
        "files": {f.name: _crc(f) for f in sorted(directory.iterdir()) if f.is_file()},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"parallel.checkpoint.load: no sharded checkpoint at {path}")
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        assert manifest["format"] == FORMAT
    except (OSError, ValueError, KeyError, AssertionError, TypeError):
        raise CheckpointError(
            f"{path}: no readable {MANIFEST} of {FORMAT} (not written by "
            "functional_llm.parallel.checkpoint.save, or damaged); its pickled DCP metadata is "
            "not read without one"
        ) from None
    for name, crc in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: the shard file {name} is missing")
        if _crc(file) != crc:
            raise CheckpointError(f"{path}: checksum mismatch (corrupted data) in {name}")
    return manifest


class _MetadataOnly(pickle.Unpickler):
    """Admits what DCP's ``.metadata`` pickle holds and nothing else."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        found = getattr(__import__(module, fromlist=[name]), name, None) if module in (
            "torch", "torch.distributed.checkpoint.metadata"
        ) else None  # fmt: skip
        dcp_class = module == "torch.distributed.checkpoint.metadata" and isinstance(found, type)
        if (module, name) in self._ALLOWED or dcp_class or isinstance(found, torch.dtype):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")


class _SafeReader(dcp.FileSystemReader):
    """DCP's reader, with its metadata read by :class:`_MetadataOnly`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        raw = Path(self.path, ".metadata").read_bytes()
        try:
            metadata = _MetadataOnly(io.BytesIO(raw)).load()
        except Exception as err:  # whatever a crafted or damaged pickle raises
            raise CheckpointError(f"{self.path}: DCP metadata refused: {err}") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{self.path}: DCP metadata is a {type(metadata).__name__}")
        metadata.storage_meta = StorageMeta(load_id=self.load_id)  # as FileSystemReader does
        return metadata


def load(path: str | os.PathLike, like: PyTree) -> PyTree:
    """The state saved at ``path``, laid out as ``like`` (same structure; each leaf gives the
    dtype and, for DTensors, the mesh and placements to load into). Checksums are verified
    first; a path missing from the checkpoint, or another shape or dtype, is an error naming
    it."""
    path = Path(path)
    manifest = _read_manifest(path)
    saved = manifest["tensors"]
    flat = {p: _empty_like(x) for p, x in tree.flatten(like).items()}
    problems = [f"{p}: missing from the checkpoint" for p in flat if p not in saved]
    for p, x in flat.items():
        want = {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
        if p in saved and saved[p] != want:
            problems.append(
                f"{p}: {tuple(saved[p]['shape'])} {saved[p]['dtype']} in the checkpoint, but "
                f"{tuple(x.shape)} {want['dtype']} in the state to load into"
            )
    if problems:
        raise CheckpointError(
            f"{path} does not fit the requested tree:\n  " + "\n  ".join(problems)
        )
    try:
        dcp.load(flat, storage_reader=_SafeReader(str(path)))
    except CheckpointError:
        raise
    except (CheckpointException, Exception) as err:  # DCP's own error is a BaseException
        raise CheckpointError(f"{path}: the sharded checkpoint cannot be read: {err}") from None
    return tree.unflatten(flat, like)
