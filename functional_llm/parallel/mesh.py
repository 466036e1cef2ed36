"""A named device mesh from a dict, on ``init_device_mesh``.

``make_mesh({"dp": 2, "tp": 2})`` is a 2x2 :class:`~torch.distributed.device_mesh.DeviceMesh`
whose axes are called ``dp`` and ``tp`` (the last axis varies fastest: ranks 0 and 1 share a
``tp`` group). It joins the default process group first if there is none, from torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...), with gloo on CPU and nccl on CUDA,
and with a ``timeout``: a collective that waits longer (a peer died or hangs) raises instead
of blocking forever.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["DEFAULT_TIMEOUT", "init_distributed", "make_mesh", "mesh_shape"]

DEFAULT_TIMEOUT = timedelta(minutes=5)


def init_distributed(
    device_type: str | None = None, timeout: timedelta | float = DEFAULT_TIMEOUT
) -> None:
    """Join the default process group from the environment unless already in one: gloo for
    CPU, nccl for CUDA; ``timeout`` (seconds or a timedelta) bounds every collective."""
    if dist.is_initialized():
        return
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if isinstance(timeout, (int, float)):
        timeout = timedelta(seconds=timeout)
    dist.init_process_group(backend, timeout=timeout)


def make_mesh(
    shape: Mapping[str, int],
    device_type: str | None = None,
    timeout: timedelta | float = DEFAULT_TIMEOUT,
) -> DeviceMesh:
    """A mesh with named axes, e.g. ``{"dp": 2, "tp": 2}``; their product must be the world
    size. ``device_type`` defaults to ``cuda`` when available, else ``cpu``."""
    if not shape:
        raise ValueError("make_mesh: give at least one axis, e.g. {'dp': 2}")
    for name, size in shape.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"make_mesh: axis names must be identifiers, got {name!r}")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"make_mesh: axis {name!r} needs a positive int size, got {size!r}")
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    init_distributed(device_type, timeout)
    world = dist.get_world_size()
    if math.prod(shape.values()) != world:
        raise ValueError(
            f"make_mesh: axes {dict(shape)} hold {math.prod(shape.values())} ranks, but the world "
            f"size is {world}"
        )
    return init_device_mesh(device_type, tuple(shape.values()), mesh_dim_names=tuple(shape))


def mesh_shape(mesh: DeviceMesh) -> dict[str, int]:
    """``{axis name: size}`` of a named mesh, in mesh order."""
    names = mesh.mesh_dim_names
    if names is None:
        raise ValueError("the mesh needs named axes: build it with make_mesh({'dp': 2, ...})")
    return dict(zip(names, mesh.shape, strict=True))
