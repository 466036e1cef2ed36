"""Stacks of blocks: :class:`Stack` (an encoder, or a decoder-only model's body with
``causal=True``), :class:`Decoder` (with cross-attention) and :class:`EncoderDecoder`, the core of
``torch.nn.Transformer``.

Params of a stack are ``{"blocks": [block_0, ..., block_{L-1}], "norm": final_norm}``; the final
norm is there when ``final_norm`` is set (``torch.nn.Transformer`` always has one, GPT-2 and
Llama too, post-LN BERT none).

``remat=True`` wraps each block in :func:`functional_llm.nn.remat.remat`: its activations are
recomputed in the backward pass instead of kept, for about one more forward pass of compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from functional_llm import random
from functional_llm.nn import taps
from functional_llm.nn.blocks import Block, DecoderBlock, Key
from functional_llm.nn.module import Layer, Params, axes_of, init_all, maybe_split
from functional_llm.nn.remat import remat

__all__ = ["Decoder", "EncoderDecoder", "Stack"]


@dataclass(frozen=True, kw_only=True)
class Stack(Layer):
    """``n_layers`` copies of ``block`` (each with its own params), then an optional norm."""

    block: Block
    n_layers: int
    final_norm: bool = True
    remat: bool = False

    def __post_init__(self) -> None:
        if self.n_layers < 0:
            raise ValueError(f"{type(self).__name__}.n_layers must be >= 0, got {self.n_layers}")

    def init(self, key: torch.Tensor) -> Params:
        keys = random.split(key, self.n_layers + 1)
        params: Params = {"blocks": [self.block.init(keys[i]) for i in range(self.n_layers)]}
        if self.final_norm:
            params["norm"] = self.block._norm().init(keys[-1])
        return params

    def axes(self) -> Params:
        axes: Params = {"blocks": [self.block.axes() for _ in range(self.n_layers)]}
        if self.final_norm:
            axes["norm"] = self.block._norm().axes()
        return axes

    def apply(
        self,
        params: Params,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        positions: torch.Tensor | None = None,
        key: Key = None,
    ) -> torch.Tensor:
        """Run the blocks in order, then the final norm."""
        run = lambda p, h, k: self.block.apply(  # noqa: E731
            p, h, mask=mask, causal=causal, positions=positions, key=k
        )
        return self._run(params, x, run, key)

    def _run(self, params: Params, x: torch.Tensor, run: Any, key: Key) -> torch.Tensor:
        """``x = run(block_params, x, key)`` through the blocks, then the final norm. Blocks
        are not recomputed while a capture is open, so that its patches hold in backward."""
        keys = maybe_split(key, self.n_layers)
        run = remat(run) if self.remat and not taps.active() else run
        for block_params, k in zip(params["blocks"], keys, strict=True):
            x = run(block_params, x, k)
        return self.finish(params, x)

    def finish(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """The final norm, where the stack has one (``params["norm"]``; tap ``norm.output``),
        else ``x``."""
        if not self.final_norm:
            return x
        return taps.tap(params["norm"], "output", self.block._norm().apply(params["norm"], x))


@dataclass(frozen=True, kw_only=True)
class Decoder(Stack):
    """A stack of :class:`DecoderBlock`, attending to an encoder's ``memory``."""

    block: DecoderBlock

    def apply(  # type: ignore[override]
        self,
        params: Params,
        x: torch.Tensor,
        memory: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        causal: bool = True,
        memory_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        key: Key = None,
    ) -> torch.Tensor:
        """Causal self-attention by default (``causal=False`` for a bidirectional decoder)."""
        run = lambda p, h, k: self.block.apply(  # noqa: E731
            p, h, memory, mask=mask, causal=causal, memory_mask=memory_mask,
            positions=positions, key=k,
        )  # fmt: skip
        return self._run(params, x, run, key)


@dataclass(frozen=True, kw_only=True)
class EncoderDecoder(Layer):
    """``torch.nn.Transformer``'s core: ``decoder(tgt, encoder(src))`` on embedded sequences.

    Params: ``{"encoder": ..., "decoder": ...}``. Masks follow this library's convention
    (True = may attend); the decoder is causal unless ``causal=False``.
    """

    encoder: Stack
    decoder: Decoder

    def init(self, key: torch.Tensor) -> Params:
        return init_all({"encoder": self.encoder, "decoder": self.decoder}, key)

    def axes(self) -> Params:
        return axes_of({"encoder": self.encoder, "decoder": self.decoder})

    def apply(
        self,
        params: Params,
        src: torch.Tensor,
        tgt: torch.Tensor,
        *,
        src_mask: torch.Tensor | None = None,
        tgt_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        causal: bool = True,
        key: Key = None,
    ) -> torch.Tensor:
        """``src: (..., S, d)``, ``tgt: (..., T, d)`` to ``(..., T, d)``."""
        k_enc, k_dec = maybe_split(key)
        memory = self.encoder.apply(params["encoder"], src, mask=src_mask, key=k_enc)
        return self.decoder.apply(
            params["decoder"], tgt, memory, mask=tgt_mask, causal=causal,
            memory_mask=memory_mask, key=k_dec,
        )  # fmt: skip
