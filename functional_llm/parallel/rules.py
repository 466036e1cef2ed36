"""Logical-axis rules: which mesh axis shards which named dimension.

Every model's ``axes()`` names each parameter dimension with a *logical* axis (``"embed"``,
``"heads"``, ``"kv_heads"``, ``"head_dim"``, ``"mlp"``, ``"vocab"``, or None); activations add
``"batch"``. :class:`Rules` maps logical axes to mesh axes, as Flax's logical partitioning and
Levanter's axis mappings do::

    Rules({"batch": "dp", "heads": "tp", "kv_heads": "tp", "mlp": "tp", "vocab": "tp"})
    Rules({"batch": "dp"}, params={"embed": "dp"})      # FSDP: params stored sharded over dp

``rules`` apply to activations and to parameters *when they are used*; ``params`` overrides
them for how parameters are *stored* (FSDP keeps them sharded and gathers each one in the
step). A logical axis maps to a mesh axis, a tuple of mesh axes (one dim split over both), or
None (replicated). Logical axes a model uses but the rules do not name are replicated, unless
``strict=True``.

:func:`placements` turns one tensor's logical axes into DTensor placements, one per mesh
dim, and rejects what cannot work with an error that names the parameter and the axis: an
unknown mesh axis, a mesh axis that would shard two dims of one tensor, a dim that the mesh
axis does not divide.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from torch.distributed.tensor import Placement, Replicate, Shard

__all__ = ["Rules", "placements"]

MeshAxes = str | tuple[str, ...] | None
MeshShape = Mapping[str, int]  # mesh axis name -> size, in mesh order


def as_mesh_axes(value: MeshAxes) -> tuple[str, ...]:
    """A rule's value as a tuple of mesh axis names (None: none)."""
    return () if value is None else (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class Rules:
    """Logical axis -> mesh axis (or axes, or None), for activations and for stored params."""

    rules: Mapping[str, MeshAxes] = field(default_factory=dict)
    params: Mapping[str, MeshAxes] = field(default_factory=dict)
    strict: bool = False

    def __post_init__(self) -> None:
        for where in ("rules", "params"):
            table = getattr(self, where)
            for logical, mesh_axes in table.items():
                ok = (
                    mesh_axes is None
                    or isinstance(mesh_axes, str)
                    or (isinstance(mesh_axes, tuple) and all(isinstance(m, str) for m in mesh_axes))
                )
                if not isinstance(logical, str) or not ok:
                    raise TypeError(
                        f"Rules.{where}[{logical!r}] = {mesh_axes!r}: a logical axis name must map "
                        "to a mesh axis name, a tuple of them, or None"
                    )
            object.__setattr__(self, where, MappingProxyType(dict(table)))

    def __hash__(self) -> int:
        return hash((tuple(self.rules.items()), tuple(self.params.items()), self.strict))

    @classmethod
    def for_mesh(cls, mesh: MeshShape, fsdp: bool = False) -> Rules:
        """The usual rules for a mesh with ``dp`` and/or ``tp`` axes: ``batch`` over ``dp``;
        ``heads``, ``kv_heads``, ``mlp`` and ``vocab`` over ``tp`` (Megatron); with ``fsdp``,
        params stored with ``embed`` over ``dp``."""
        rules: dict[str, MeshAxes] = {"batch": "dp"} if "dp" in mesh else {}
        if "tp" in mesh:
            rules |= dict.fromkeys(("heads", "kv_heads", "mlp", "vocab"), "tp")
        return cls(rules, {"embed": "dp"} if fsdp else {})

    def for_params(self) -> dict[str, MeshAxes]:
        """The rules that place stored parameters: ``rules`` overridden by ``params``."""
        return {**self.rules, **self.params}

    def check_mesh(self, mesh: MeshShape) -> None:
        """Every mesh axis the rules name exists in ``mesh``."""
        for where in ("rules", "params"):
            for logical, value in getattr(self, where).items():
                for m in as_mesh_axes(value):
                    if m not in mesh:
                        raise ValueError(
                            f"Rules.{where} maps {logical!r} to mesh axis {m!r}, but the mesh has "
                            f"axes {tuple(mesh)}"
                        )


def placements(
    path: str,
    shape: Sequence[int],
    axes: Sequence[str | None],
    mesh: MeshShape,
    rules: Mapping[str, MeshAxes],
    strict: bool = False,
) -> tuple[Placement, ...]:
    """DTensor placements (one per mesh axis) for a tensor named ``path`` whose dims carry the
    logical ``axes``. A mesh axis shards at most one dim; a dim split over several mesh axes
    gets ``Shard(dim)`` on each, in mesh order."""
    if len(axes) != len(shape):
        raise ValueError(
            f"{path}: logical axes {tuple(axes)} name {len(axes)} dims, but the tensor has shape "
            f"{tuple(shape)}"
        )
    names = list(mesh)
    out: list[Placement] = [Replicate()] * len(names)
    used: dict[str, int] = {}
    for dim, logical in enumerate(axes):
        if logical is None:
            continue
        if logical not in rules:
            if strict:
                raise ValueError(
                    f"{path}: logical axis {logical!r} (dim {dim}) has no rule; rules name "
                    f"{sorted(rules)}"
                )
            continue
        mesh_axes = as_mesh_axes(rules[logical])
        for m in mesh_axes:
            if m not in mesh:
                raise ValueError(
                    f"{path}: logical axis {logical!r} maps to mesh axis {m!r}, but the mesh has "
                    f"axes {tuple(names)}"
                )
            if m in used:
                raise ValueError(
                    f"{path}: mesh axis {m!r} would shard dim {used[m]} ({axes[used[m]]!r}) and "
                    f"dim {dim} ({logical!r}) of one tensor; map one of them elsewhere"
                )
            used[m] = dim
            out[names.index(m)] = Shard(dim)
        ways = math.prod(mesh[m] for m in mesh_axes)
        if ways > 1 and shape[dim] % ways:
            raise ValueError(
                f"{path}: dim {dim} ({logical!r}) has size {shape[dim]}, which mesh axes "
                f"{mesh_axes} (size {ways}) do not divide"
            )
    return tuple(out)
