"""Position information: sinusoidal encodings and rotary embeddings (learned positions are an
:class:`~functional_llm.nn.Embedding` over position ids).

Sinusoidal (Vaswani et al. 2017), interleaved as in the PyTorch tutorial's encoder:
``PE[p, 2i] = sin(p / base^(2i/d))``, ``PE[p, 2i+1] = cos(p / base^(2i/d))``.

Rotary (Su et al. 2021, RoFormer), the half-split layout of GPT-NeoX and Hugging Face Llama:
with ``x = [x1, x2]`` split in halves and angles ``a_i = p * theta^(-2i/d)``,
``rope(x) = [x1 cos a - x2 sin a, x2 cos a + x1 sin a]``. Relative: ``<rope(q, p), rope(k, s)>``
depends on ``p - s`` only. :class:`RopeScaling` stretches the frequencies ``w_i = theta^(-2i/d)``
for contexts longer than the model was trained on: ``linear`` divides them all by ``factor``
(position interpolation); ``llama3`` divides only the low ones, whose wavelength ``2 pi / w``
exceeds ``original_max_len / low_freq_factor``, keeps those shorter than ``original_max_len /
high_freq_factor`` and blends in between (Llama 3.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["RopeScaling", "positions_like", "rope", "sinusoidal"]


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """How rotary frequencies are stretched: ``kind`` is ``linear`` or ``llama3``."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "llama3"):
            raise ValueError(f"RopeScaling.kind must be 'linear' or 'llama3', got {self.kind!r}")
        if self.factor <= 0 or self.original_max_len <= 0:
            raise ValueError("RopeScaling.factor and original_max_len must be positive")
        if self.kind == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError("RopeScaling: need 0 < low_freq_factor < high_freq_factor")

    def __call__(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """The stretched frequencies."""
        if self.kind == "linear":
            return inv_freq / self.factor
        wavelen = 2 * math.pi / inv_freq
        low = self.original_max_len / self.low_freq_factor  # longer wavelengths: divided
        high = self.original_max_len / self.high_freq_factor  # shorter ones: kept
        scaled = torch.where(wavelen > low, inv_freq / self.factor, inv_freq)
        smooth = (self.original_max_len / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        blended = (1 - smooth) * scaled / self.factor + smooth * scaled
        return torch.where((wavelen >= high) & (wavelen <= low), blended, scaled)


def positions_like(ids: torch.Tensor, offset: int | torch.Tensor = 0) -> torch.Tensor:
    """Position ids ``offset, offset+1, ...`` along the last axis of ``ids``."""
    return torch.arange(ids.shape[-1], device=ids.device) + offset


def _angles(
    positions: torch.Tensor, dim: int, base: float, scaling: RopeScaling | None = None
) -> torch.Tensor:
    inv_freq = base ** (
        -torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim
    )
    if scaling is not None:
        inv_freq = scaling(inv_freq)
    return positions.to(torch.float32)[..., None] * inv_freq  # (..., T, dim/2)


def sinusoidal(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """``(..., T)`` positions to ``(..., T, dim)`` fixed encodings (``dim`` even)."""
    if dim % 2:
        raise ValueError(f"sinusoidal encodings need an even dim, got {dim}")
    a = _angles(positions, dim, base)
    return torch.stack([a.sin(), a.cos()], dim=-1).flatten(-2)


def rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    theta: float = 10000.0,
    scaling: RopeScaling | None = None,
) -> torch.Tensor:
    """Rotate ``x`` of shape ``(..., T, heads, head_dim)`` by its ``(..., T)`` positions."""
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    a = _angles(positions, head_dim, theta, scaling)[..., None, :]  # (..., T, 1, head_dim/2)
    cos, sin = a.cos().to(x.dtype), a.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
