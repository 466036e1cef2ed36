"""Position information: sinusoidal encodings and rotary embeddings (learned positions are an
:class:`~functional_llm.nn.Embedding` over position ids).

Sinusoidal (Vaswani et al. 2017), interleaved as in the PyTorch tutorial's encoder:
``PE[p, 2i] = sin(p / base^(2i/d))``, ``PE[p, 2i+1] = cos(p / base^(2i/d))``.

Rotary (Su et al. 2021, RoFormer), the half-split layout of GPT-NeoX and Hugging Face Llama:
with ``x = [x1, x2]`` split in halves and angles ``a_i = p * theta^(-2i/d)``,
``rope(x) = [x1 cos a - x2 sin a, x2 cos a + x1 sin a]``. Relative: ``<rope(q, p), rope(k, s)>``
depends on ``p - s`` only.
"""

from __future__ import annotations

import torch

__all__ = ["positions_like", "rope", "sinusoidal"]


def positions_like(ids: torch.Tensor, offset: int | torch.Tensor = 0) -> torch.Tensor:
    """Position ids ``offset, offset+1, ...`` along the last axis of ``ids``."""
    return torch.arange(ids.shape[-1], device=ids.device) + offset


def _angles(positions: torch.Tensor, dim: int, base: float) -> torch.Tensor:
    inv_freq = base ** (
        -torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim
    )
    return positions.to(torch.float32)[..., None] * inv_freq  # (..., T, dim/2)


def sinusoidal(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """``(..., T)`` positions to ``(..., T, dim)`` fixed encodings (``dim`` even)."""
    if dim % 2:
        raise ValueError(f"sinusoidal encodings need an even dim, got {dim}")
    a = _angles(positions, dim, base)
    return torch.stack([a.sin(), a.cos()], dim=-1).flatten(-2)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate ``x`` of shape ``(..., T, heads, head_dim)`` by its ``(..., T)`` positions."""
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    a = _angles(positions, head_dim, theta)[..., None, :]  # (..., T, 1, head_dim/2)
    cos, sin = a.cos().to(x.dtype), a.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
