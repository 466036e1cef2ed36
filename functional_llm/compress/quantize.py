"""Weight-only quantisation as a transformation of the param pytree.

``quantize(params, axes, bits=8)`` replaces the chosen Linear weights (by path glob; embeddings,
norms and biases stay float) with packed ones that :class:`~functional_llm.nn.Linear` multiplies
with ATen's weight-only kernels; everything else about the model is unchanged, so quantised
params decode, compile and checkpoint like float ones.

    int8, per output channel:   w ~= s q (+ z),       q in [-128, 127]
        symmetric: s = max|w| / 127;  asymmetric: s = (max w - min w) / 255, z = min w + 128 s
    int4, per group of g inputs: w ~= s (q - 8) + z,  q in [0, 15]
        symmetric: s = max|w| / 7, z = 0;  asymmetric: s = (max w - min w) / 15, z = min w + 8 s

The error is at most ``s / 2`` per weight (the rounding step). Kernels: ``_weight_int8pack_mm``
(x float, q int8 ``(out, in)``, per-channel scales) and ``_weight_int4pack_mm_for_cpu`` (q
packed two per byte in the CPU kernel's layout, group-wise scales and zeros), the ones
``torchao`` and gpt-fast call on the CPU; chosen over torchao's tensor subclasses because plain
tensors in a pytree keep params data (checkpoints, vmap, DTensor placement need nothing new).
int4 uses the CPU layout: quantise and run it on the CPU (other devices dequantise).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import optree
import torch

from functional_llm import tree
from functional_llm.nn.linear import is_packed

__all__ = ["DEFAULT_TARGETS", "Int4Weight", "Int8Weight", "dequantize", "quantize"]

#: What ``quantize`` packs unless told otherwise: every Linear weight inside the blocks.
DEFAULT_TARGETS = ("*blocks.*.w",)


def _n_in(axes: tuple) -> int:
    """How many leading axes of a Linear weight are inputs: all but the last for a projection
    back to the residual stream (``(heads, head_dim, embed)``, ``(mlp, embed)``), else one."""
    return len(axes) - 1 if axes and axes[-1] == "embed" and len(axes) > 2 else 1


class Int8Weight(NamedTuple):
    """int8 ``q (out, in)`` and float ``scale (out,)`` (and ``offset (out,)`` if asymmetric:
    ``w = scale * q + offset``); ``shape`` is the float weight's ``(*in, *out)``.
    ``bf16_activations``: the kernel multiplies bfloat16 inputs (its fast path on CPUs with
    AVX512-BF16, at bfloat16's precision for the activations)."""

    q: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    shape: tuple[int, ...]
    bf16_activations: bool = False
    packed_weight = True

    def linear(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 (rows, in) @ w``: the int8 kernel on the CPU, then the offset's rank-one term."""
        if x2.device.type == "cpu" and self.bf16_activations:
            xb, sb = x2.to(torch.bfloat16), self.scale.to(torch.bfloat16)
            y = torch._weight_int8pack_mm(xb, self.q, sb).to(x2.dtype)
        elif x2.device.type == "cpu" and x2.dtype == torch.float32:
            y = torch._weight_int8pack_mm(x2, self.q, self.scale.to(x2.dtype))
        else:
            y = x2 @ (self.q.to(x2.dtype) * self.scale.to(x2.dtype)[:, None]).T
        if self.offset is not None:
            y = y + x2.sum(-1, keepdim=True) * self.offset.to(x2.dtype)
        return y

    def dequantize(self) -> torch.Tensor:
        w = self.q.float() * self.scale[:, None]
        if self.offset is not None:
            w = w + self.offset[:, None]
        return w.T.reshape(self.shape)


class Int4Weight(NamedTuple):
    """4-bit ``packed (out, in / 2)`` (uint8, the CPU kernel's layout) and ``scales_and_zeros
    (in / group, out, 2)``; ``shape`` is the float weight's ``(*in, *out)``."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    shape: tuple[int, ...]
    packed_weight = True

    @property
    def group_size(self) -> int:
        return 2 * self.packed.shape[1] // self.scales_and_zeros.shape[0]

    def linear(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.device.type == "cpu":
            sz = self.scales_and_zeros.to(x2.dtype)
            return torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, sz)
        return x2 @ self.dequantize().reshape(x2.shape[-1], -1).to(x2)

    def dequantize(self) -> torch.Tensor:
        """The float weight, read back through the kernel itself (``I @ W``: the packed layout
        is the kernel's own)."""
        k = 2 * self.packed.shape[1]
        eye = torch.eye(k, dtype=self.scales_and_zeros.dtype)
        sz = self.scales_and_zeros
        return torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, sz).reshape(
            self.shape
        )


def _int8(w2: torch.Tensor, symmetric: bool, shape: tuple[int, ...], bf16: bool) -> Int8Weight:
    """``w2 (out, in)`` per output channel."""
    if symmetric:
        scale = (w2.abs().amax(1) / 127).clamp(min=1e-12)
        q = torch.round(w2 / scale[:, None]).clamp(-128, 127)
        return Int8Weight(q.to(torch.int8), scale, None, shape, bf16)
    low, high = w2.amin(1), w2.amax(1)
    scale = ((high - low) / 255).clamp(min=1e-12)
    offset = low + 128 * scale
    q = torch.round((w2 - offset[:, None]) / scale[:, None]).clamp(-128, 127)
    return Int8Weight(q.to(torch.int8), scale, offset, shape, bf16)


def _int4(
    w2: torch.Tensor, group: int, symmetric: bool, shape: tuple[int, ...], path: str
) -> Int4Weight:
    out, k = w2.shape
    if out % 16 or k % 32:
        raise ValueError(f"quantize: int4 needs {path}'s output dim a multiple of 16 and input "
                         f"dim of 32 (the CPU kernel's tiles), got ({out}, {k})")  # fmt: skip
    if k % group:
        raise ValueError(f"quantize: group_size {group} does not divide {path}'s input dim {k}")
    g = w2.reshape(out, k // group, group)
    if symmetric:
        scale = (g.abs().amax(-1) / 7).clamp(min=1e-12)
        zero = torch.zeros_like(scale)
        q = torch.round(g / scale[..., None]) + 8
    else:
        low, high = g.amin(-1), g.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-12)
        zero = low + 8 * scale
        q = torch.round((g - low[..., None]) / scale[..., None])
    q = q.clamp(0, 15).to(torch.int32).reshape(out, k)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (k / group, out, 2)
    return Int4Weight(packed, sz.to(w2.dtype), shape)


def quantize(
    params: Any,
    axes: Any,
    *,
    bits: int = 8,
    group_size: int | None = None,
    symmetric: bool = True,
    include: tuple[str, ...] = DEFAULT_TARGETS,
    exclude: tuple[str, ...] = (),
    bf16_activations: bool = False,
) -> Any:
    """``params`` with the Linear weights matching ``include`` (and not ``exclude``) replaced by
    :class:`Int8Weight` (``bits=8``, per output channel) or :class:`Int4Weight` (``bits=4``, per
    ``group_size`` inputs, default 32). ``axes`` (``model.axes()``) says which dims of each
    weight are inputs. A glob that matches no weight is an error. ``bf16_activations`` (int8):
    multiply bfloat16 activations, the kernel's fast path (see :class:`Int8Weight`)."""
    if bits not in (4, 8):
        raise ValueError(f"quantize: bits must be 4 or 8, got {bits}")
    if bits == 8 and group_size is not None:
        raise ValueError("quantize: int8 is per output channel; group_size is for bits=4")
    group = group_size or 32
    flat, flat_axes = tree.flatten(params), tree.flatten_axes(axes)
    chosen = [p for p in flat if tree.matches(p, *include) and not tree.matches(p, *exclude)]
    chosen = [p for p in chosen if flat[p].ndim >= 2 and flat[p].is_floating_point()]
    tree.require_matches("quantize", list(flat), include)
    out = dict(flat)
    for path in chosen:
        w = flat[path]
        n_in = _n_in(flat_axes.get(path, ()))
        w2 = w.detach().reshape(math.prod(w.shape[:n_in]), -1).T.float().contiguous()  # (out, in)
        shape = tuple(w.shape)
        if bits == 8:
            out[path] = _int8(w2, symmetric, shape, bf16_activations)
        else:
            out[path] = _int4(w2, group, symmetric, shape, path)
    return tree.unflatten(out, params)


def dequantize(qparams: Any) -> Any:
    """Float params again: every packed weight read back (the values its kernel multiplies by)."""
    return optree.tree_map(
        lambda x: x.dequantize() if is_packed(x) else x, qparams, is_leaf=is_packed
    )
