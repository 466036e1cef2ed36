"""The one mechanism every family's name table runs through: Hugging Face tensors to our param
tree and back, with every missing, extra or misshapen tensor named.

A :class:`Rule` pairs one Hugging Face tensor with one of our leaves, or with several of ours
fused along its output axis (GPT-2's ``c_attn`` holds q, k and v). Our weights are stored
``(in..., out...)``; Hugging Face stores ``torch.nn.Linear`` weights ``(out, in)``
(``linear=True``) and GPT-2's ``Conv1D`` weights ``(in, out)``. Vectors (biases, norm scales)
are 1-D there and may be ``(heads, head_dim)`` here; ``row=True`` marks a ``(1, n)`` vector
(Marian's ``final_logits_bias``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from functional_llm import tree

__all__ = ["MappingError", "Rule", "from_hf", "to_hf"]


class MappingError(ValueError):
    """A checkpoint or config that does not fit the model: names the tensor or field."""


@dataclass(frozen=True)
class Rule:
    """``ours`` (one path, or several fused along the output axis) <-> the tensor ``hf``."""

    ours: tuple[str, ...]
    hf: str
    linear: bool = False  # Hugging Face stores (out, in)
    n_in: int = 1  # leading input dims of our weight: 2 for an attention output (heads, hd, d)
    row: bool = False  # a vector Hugging Face stores as (1, n)


def rule(ours: str | tuple[str, ...], hf: str, **kw: bool | int) -> Rule:
    return Rule((ours,) if isinstance(ours, str) else ours, hf, **kw)  # type: ignore[arg-type]


def _is_vector(path: str) -> bool:
    return path.rsplit(".", 1)[-1] in ("b", "bias", "scale")


def _hf_piece_shape(r: Rule, path: str, shape: torch.Size) -> tuple[int, ...]:
    """One of our leaves as Hugging Face lays it out before fusing: ``(in, out)`` or ``(n,)``."""
    if _is_vector(path):
        return (math.prod(shape),)
    if path.endswith(".table"):
        return tuple(shape)
    return (math.prod(shape[: r.n_in]), math.prod(shape[r.n_in :]))


def hf_shape(r: Rule, shapes: Mapping[str, torch.Size]) -> tuple[int, ...]:
    """The shape Hugging Face gives the tensor of rule ``r``, from our leaves' shapes."""
    pieces = [_hf_piece_shape(r, p, shapes[p]) for p in r.ours]
    shape = (*pieces[0][:-1], sum(p[-1] for p in pieces))
    if r.linear and len(shape) == 2:
        shape = shape[::-1]
    return (1, *shape) if r.row else shape


def _shapes(like: object) -> dict[str, torch.Size]:
    return {path: leaf.shape for path, leaf in tree.flatten(like).items()}


def from_hf(
    model: object,
    rules: Iterable[Rule],
    tensors: Mapping[str, torch.Tensor],
    *,
    ignore: Iterable[str] = (),
    source: str = "checkpoint",
    dtype: torch.dtype | None = None,
) -> dict:
    """Our param tree for ``model`` from Hugging Face ``tensors``. Tensors in ``ignore`` (tied
    copies, buffers) may be present or not; any other tensor no rule reads is an error, as is
    one a rule needs and the checkpoint lacks, or one of the wrong shape."""
    rules, like = list(rules), model.shapes()  # type: ignore[attr-defined]
    shapes = _shapes(like)
    unmapped = sorted(set(shapes) - {p for r in rules for p in r.ours})
    if unmapped:  # a table bug, not a user error
        raise AssertionError(f"the name table leaves {unmapped} unmapped")
    wanted = {r.hf for r in rules}
    missing = sorted(wanted - set(tensors))
    if missing:
        raise MappingError(f"{source} lacks {len(missing)} tensor(s) the model needs: {missing}")
    extra = sorted(set(tensors) - wanted - set(ignore))
    if extra:
        raise MappingError(
            f"{source} has {len(extra)} tensor(s) the model has no place for: {extra}"
        )
    flat: dict[str, torch.Tensor] = {}
    for r in rules:
        t, want = tensors[r.hf], hf_shape(r, shapes)
        if tuple(t.shape) != want:
            raise MappingError(
                f"{source}: {r.hf} has shape {tuple(t.shape)} but the config gives {want} "
                f"(our {', '.join(r.ours)})"
            )
        t = t.reshape(t.shape[1:]) if r.row else t
        t = t.T if r.linear and t.ndim == 2 else t
        sizes = [_hf_piece_shape(r, p, shapes[p])[-1] for p in r.ours]
        for path, piece in zip(r.ours, torch.split(t, sizes, dim=-1), strict=True):
            flat[path] = piece.reshape(shapes[path]).to(dtype or piece.dtype).contiguous()
    return tree.unflatten(flat, like)


def to_hf(model: object, rules: Iterable[Rule], params: object) -> dict[str, torch.Tensor]:
    """Hugging Face tensors (contiguous, unshared) from our ``params`` for ``model``."""
    flat = tree.flatten(params)
    shapes = _shapes(model.shapes())  # type: ignore[attr-defined]
    for path, shape in shapes.items():
        got = flat.get(path)
        if got is None:
            raise MappingError(f"params lack {path} (shape {tuple(shape)})")
        if got.shape != shape:
            raise MappingError(
                f"params {path} has shape {tuple(got.shape)} but the model's config gives "
                f"{tuple(shape)}"
            )
    out = {}
    for r in rules:
        pieces = [flat[p].reshape(_hf_piece_shape(r, p, shapes[p])) for p in r.ours]
        t = torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]
        t = t.T if r.linear and t.ndim == 2 else t
        out[r.hf] = (t[None] if r.row else t).detach().contiguous().clone()
    return out
