"""Multi-head attention: ``softmax(Q K^T / sqrt(d_k) + M) V`` per head, then ``W_o``.

Self- and cross-attention, causal and key-padding masks, multi-head, multi-query and
grouped-query attention (``n_kv_heads`` = ``n_heads``, 1, or a divisor of it), and rotary
positions on queries and keys. The fast path is
``torch.nn.functional.scaled_dot_product_attention``; the explicit path (same math) runs when
the attention weights are captured (the ``weights`` tap, :mod:`functional_llm.nn.taps`) or
attention dropout is on, since SDPA's own dropout would read the global RNG.

Masks follow SDPA and JAX: a boolean ``mask`` is True where a query *may* attend, and
broadcasts to ``(..., heads, T_q, T_k)``. :func:`key_padding_mask` and :func:`causal_mask`
build the usual ones. A query that may attend to nothing outputs zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from functional_llm.init import Initializer
from functional_llm.nn.dropout import dropout
from functional_llm.nn.linear import Linear
from functional_llm.nn.module import Layer, Params, axes_of, init_all
from functional_llm.nn.positions import RopeScaling, positions_like, rope
from functional_llm.nn.taps import tap, watched

__all__ = ["MultiHeadAttention", "causal_mask", "key_padding_mask"]


def key_padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """``(..., T_k)`` booleans, True for real tokens, to a mask ``(..., 1, 1, T_k)``."""
    return valid.bool()[..., None, None, :]


def causal_mask(
    t_q: int, t_k: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """``(T_q, T_k)``: query ``i`` may see keys ``j <= i + (T_k - T_q)`` (the last queries of a
    longer key sequence, as with a cache)."""
    t_k = t_q if t_k is None else t_k
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(t_k - t_q)


@dataclass(frozen=True, kw_only=True)
class MultiHeadAttention(Layer):
    """Projections ``q: (d_model, heads, head_dim)``, ``k, v: (kv_dim, kv_heads, head_dim)``,
    ``o: (heads, head_dim, d_model)``; ``kv_dim`` is the memory's width in cross-attention."""

    d_model: int
    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    kv_dim: int | None = None
    bias: bool = True
    dropout: float = 0.0
    rope_theta: float | None = None
    rope_scaling: RopeScaling | None = None
    w_init: Initializer | None = None
    out_init: Initializer | None = None
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.n_heads <= 0:
            raise ValueError(f"MultiHeadAttention.n_heads must be positive, got {self.n_heads}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"MultiHeadAttention.d_model ({self.d_model}) must be divisible by n_heads "
                f"({self.n_heads}) unless head_dim is given"
            )
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise ValueError(
                f"MultiHeadAttention.n_kv_heads ({self.n_kv_heads}) must be positive and divide "
                f"n_heads ({self.n_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MultiHeadAttention.dropout must be in [0, 1), got {self.dropout}")
        if self.rope_theta is not None and self.dim_per_head % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.dim_per_head}")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def _proj(self, name: str) -> Linear:
        """The ``q``, ``k``, ``v`` or ``o`` projection."""
        if name == "o":
            return Linear(
                in_dims=(self.n_heads, self.dim_per_head),
                out_dims=self.d_model,
                bias=self.bias,
                in_axes=("heads", "head_dim"),
                out_axes=("embed",),
                w_init=self.out_init or self.w_init,
                dtype=self.dtype,
            )
        heads, axis = (self.n_heads, "heads") if name == "q" else (self.kv_heads, "kv_heads")
        width = self.d_model if name == "q" else (self.kv_dim or self.d_model)
        return Linear(
            in_dims=width,
            out_dims=(heads, self.dim_per_head),
            bias=self.bias,
            in_axes=("embed",),
            out_axes=(axis, "head_dim"),
            w_init=self.w_init,
            dtype=self.dtype,
        )

    def init(self, key: torch.Tensor) -> Params:
        return init_all({name: self._proj(name) for name in "qkvo"}, key)

    def axes(self) -> Params:
        return axes_of({name: self._proj(name) for name in "qkvo"})

    def apply(
        self,
        params: Params,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        positions: torch.Tensor | None = None,
        key: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from ``x: (..., T, d_model)`` to ``context: (..., S, kv_dim)`` (``x`` itself if
        None). ``positions`` (default ``0..T-1``) drive rotary embeddings in self-attention.
        Taps (:mod:`functional_llm.nn.taps`): ``weights`` ``(..., heads, T, S)`` and ``heads``
        ``(..., T, heads, head_dim)``."""
        q, k, v = self._project(params, x, context, positions)
        if causal:
            tri = causal_mask(q.shape[-2], k.shape[-2], x.device)
            mask = tri if mask is None else mask & tri
        return self._attend(params, q, k, v, mask, key)

    def apply_cached(
        self,
        params: Params,
        x: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        *,
        slots: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        donate: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Self-attention of ``x: (..., T, d_model)`` as the cache slots ``slots: (T,)``.

        ``cache`` holds every slot's keys and values, ``(..., kv_heads, L, head_dim)`` each; the
        new ones are written at ``slots`` (into fresh buffers, or into ``cache``'s own with
        ``donate=True``), then the queries attend to all ``L`` slots under ``mask``
        (``(..., 1, T, L)``: which slots each query may see). Returns the output and the cache.
        The math is :meth:`apply`'s: the same projections, rotary positions and kernel."""
        q, k, v = self._project(params, x, None, positions)
        k_all, v_all = (
            buf.index_copy_(-2, slots, new) if donate else buf.index_copy(-2, slots, new)
            for buf, new in zip(cache, (k, v), strict=True)
        )
        return self._attend(params, q, k_all, v_all, mask, None), (k_all, v_all)

    def memory_kv(self, params: Params, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention's keys and values for ``memory: (..., S, kv_dim)``, ``(..., kv_heads,
        S, head_dim)`` each: computed once per source when decoding (:meth:`apply_memory`)."""
        k, v = (self._proj(n).apply(params[n], memory).transpose(-3, -2) for n in "kv")
        return k, v

    def apply_memory(
        self,
        params: Params,
        x: torch.Tensor,
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        *,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-attention of ``x: (..., T, d_model)`` to keys and values from
        :meth:`memory_kv`: :meth:`apply` with ``context=memory``, the memory's projections
        reused."""
        q = self._proj("q").apply(params["q"], x).transpose(-3, -2)
        return self._attend(params, q, *memory_kv, mask, None)

    def _project(
        self,
        params: Params,
        x: torch.Tensor,
        context: torch.Tensor | None,
        positions: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries ``(..., heads, T, head_dim)``, keys and values ``(..., kv_heads, S,
        head_dim)``, with rotary positions applied in self-attention."""
        memory = x if context is None else context
        q = self._proj("q").apply(params["q"], x)  # (..., T, H, hd)
        k = self._proj("k").apply(params["k"], memory)  # (..., S, Hkv, hd)
        v = self._proj("v").apply(params["v"], memory)
        if self.rope_theta is not None and context is None:
            pos = positions_like(x[..., 0]) if positions is None else positions
            theta, scaling = self.rope_theta, self.rope_scaling
            q, k = rope(q, pos, theta, scaling), rope(k, pos, theta, scaling)
        q, k, v = (t.transpose(-3, -2) for t in (q, k, v))  # heads before time
        return q, k, v

    def _attend(
        self,
        params: Params,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        key: torch.Tensor | None,
    ) -> torch.Tensor:
        """The attention kernel and the output projection."""
        if mask is not None and mask.dtype != torch.bool:
            raise TypeError(f"attention mask must be boolean (True = may attend), got {mask.dtype}")
        if self.kv_heads != self.n_heads:  # grouped-query: each kv head serves a group
            group = self.n_heads // self.kv_heads
            k, v = (t.repeat_interleave(group, dim=-3) for t in (k, v))
        # keyed dropout (SDPA's reads the global RNG), and vmap on CPU: SDPA's CPU kernel has no
        # batching rule, so vmap would fall back to a per-example loop
        if self.dropout > 0.0 or _under_vmap_on_cpu(q) or watched(params, "weights"):
            weights = tap(params, "weights", _attention_weights(q, k, mask))
            out = dropout(weights, self.dropout, key=key) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        # A copy in (B, T, H, Dh) order: SDPA's output layout depends on the kernel it picks, and
        # on a sharded DTensor the local shard's layout can differ from what the global strides
        # claim, so the projection's reshape would take the view path and fail (seen with
        # grouped-query attention after a step). One copy of the attention output per layer.
        out = out.transpose(-3, -2).clone(memory_format=torch.contiguous_format)
        return self._proj("o").apply(params["o"], tap(params, "heads", out))


def _under_vmap_on_cpu(q: torch.Tensor) -> bool:
    """Inside ``torch.func`` transforms, eager or traced by ``torch.compile``, on the CPU."""
    return q.device.type == "cpu" and torch._C._are_functorch_transforms_active()


def _attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA's probabilities, ``softmax(q k^T / sqrt(d))`` under ``mask``, made explicit (for
    keyed dropout, for vmap on the CPU and for the ``weights`` tap)."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is not None:
        # A finite fill keeps gradients finite for rows that see no key; those rows are then
        # zeroed, matching SDPA's output for them.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1)
    if mask is not None:
        weights = weights * mask.any(dim=-1, keepdim=True)
    return weights
