"""The encoder-decoder Transformer of "Attention is all you need", as the article builds it:
embeddings, positions, the ``torch.nn.Transformer`` core, an output projection.

    memory = Encoder(sqrt(d) E_src[src] + PE)          bidirectional over the source
    h      = Decoder(sqrt(d) E_tgt[tgt] + PE, memory)    causal over the target
    logits = W_out h + b_out                              (..., T, tgt_vocab)

``copy_source=True`` adds the pointer-generator's copy head (:class:`~functional_llm.nn.Pointer`):
the decoder then returns ``log p``, the mixture of generating from the logits and copying a
source token, which every loss and search takes as it takes logits.

Field names follow ``torch.nn.Transformer`` (``d_model, nhead, num_encoder_layers, ...``).
``final_norm=False`` drops the encoder's and decoder's final LayerNorm and
``scale_embedding=False`` the ``sqrt(d)`` factor: Marian and BART are built that way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch

from functional_llm import random
from functional_llm.init import Normal
from functional_llm.models.config import check_choice, check_divides, check_positive, check_rate
from functional_llm.models.inputs import check_ids, check_like
from functional_llm.models.stages import Stage, block_ranges
from functional_llm.nn import (
    Block,
    Decoder,
    DecoderBlock,
    Embedding,
    EncoderDecoder,
    Linear,
    Stack,
    dropout,
    key_padding_mask,
)
from functional_llm.nn.module import Layer, Params, axes_of, init_all, maybe_split
from functional_llm.nn.pointer import Pointer
from functional_llm.nn.positions import positions_like, sinusoidal
from functional_llm.types import ACTIVATION_NAMES, Activation

__all__ = ["Transformer", "TransformerConfig"]

B = TypeVar("B", bound=Block)


@dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Defaults are the paper's base model and ``torch.nn.Transformer``'s.

    ``embed_std``: the embeddings' init is ``N(0, embed_std^2)``; 1 is ``torch.nn.Embedding``'s.
    With ``scale_embedding`` the model reads ``sqrt(d_model) E[ids]``, whose entries then have
    standard deviation ``sqrt(d_model)`` against the sinusoidal positions' at most 1, so the
    positions barely register at first. ``d_model ** -0.5`` (fairseq's and tensor2tensor's
    init) puts both on the same scale: the small translator of ``experiments/translate.py``
    reaches a held-out loss of 5.09 in 400 steps with it and 5.38 without.

    ``share_embeddings``: one table for source and target tokens (fairseq's
    ``--share-all-embeddings``, the ``shared`` table of T5, BART and Marian), for a joint
    vocabulary (``src_vocab_size == tgt_vocab_size``). The params then have no ``src_embed``:
    both sides read ``tgt_embed``, and with ``tie_output`` so does the output layer.

    ``copy_source``: the decoder may copy source tokens (the pointer-generator,
    :mod:`functional_llm.nn.pointer`), for a joint vocabulary. The params gain ``copy``.
    """

    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 512
    nhead: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: Activation = "relu"
    norm_first: bool = False
    layer_norm_eps: float = 1e-5
    max_seq_len: int = 5000
    positions: str = "sinusoidal"
    tie_output: bool = False
    share_embeddings: bool = False
    copy_source: bool = False
    final_norm: bool = True
    scale_embedding: bool = True
    embed_std: float = 1.0
    dtype: torch.dtype = torch.float32
    remat: bool = False

    def __post_init__(self) -> None:
        check_positive(
            self,
            "src_vocab_size",
            "tgt_vocab_size",
            "d_model",
            "nhead",
            "num_encoder_layers",
            "num_decoder_layers",
            "dim_feedforward",
            "max_seq_len",
        )
        check_divides(self, "nhead", "d_model")
        if not self.embed_std > 0:
            raise ValueError(f"TransformerConfig.embed_std must be positive, got {self.embed_std}")
        for joint in ("share_embeddings", "copy_source"):
            if getattr(self, joint) and self.src_vocab_size != self.tgt_vocab_size:
                raise ValueError(
                    f"TransformerConfig.{joint} needs one vocabulary: src_vocab_size "
                    f"{self.src_vocab_size} != tgt_vocab_size {self.tgt_vocab_size}"
                )
        check_rate(self, "dropout")
        check_choice(self, "activation", ACTIVATION_NAMES)
        check_choice(self, "positions", ("sinusoidal", "learned"))
        if self.positions == "sinusoidal" and self.d_model % 2:
            raise ValueError(
                f"TransformerConfig.d_model must be even with sinusoidal positions: {self.d_model}"
            )


@dataclass(frozen=True)
class Transformer(Layer):
    """Params: ``src_embed``, ``tgt_embed`` (and ``src_pos``/``tgt_pos`` if learned),
    ``encoder``, ``decoder`` (as :class:`~functional_llm.nn.EncoderDecoder`), ``out`` (and
    ``copy`` with ``copy_source``)."""

    config: TransformerConfig

    @property
    def core(self) -> EncoderDecoder:
        c = self.config
        return EncoderDecoder(
            encoder=Stack(
                block=self._block(Block),
                n_layers=c.num_encoder_layers,
                final_norm=c.final_norm,
                remat=c.remat,
            ),
            decoder=Decoder(
                block=self._block(DecoderBlock),
                n_layers=c.num_decoder_layers,
                final_norm=c.final_norm,
                remat=c.remat,
            ),
        )

    def _block(self, kind: type[B]) -> B:
        """An encoder or decoder block with the config's settings (``torch.nn``'s layers)."""
        c = self.config
        return kind(
            d_model=c.d_model,
            n_heads=c.nhead,
            d_ff=c.dim_feedforward,
            activation=c.activation,
            dropout=c.dropout,
            norm_first=c.norm_first,
            norm_eps=c.layer_norm_eps,
            dtype=c.dtype,
        )

    def _parts(self) -> dict[str, Layer]:
        c = self.config
        parts: dict[str, Layer] = {}
        if not c.share_embeddings:
            parts["src_embed"] = Embedding(
                num=c.src_vocab_size,
                dim=c.d_model,
                axes_names=("src_vocab", "embed"),
                init_fn=Normal(c.embed_std),
                dtype=c.dtype,
            )
        parts["tgt_embed"] = Embedding(
            num=c.tgt_vocab_size, dim=c.d_model, init_fn=Normal(c.embed_std), dtype=c.dtype
        )
        if c.positions == "learned":
            for side in ("src", "tgt"):
                parts[f"{side}_pos"] = Embedding(
                    num=c.max_seq_len, dim=c.d_model, axes_names=(None, "embed"), dtype=c.dtype
                )
        if not c.tie_output:
            parts["out"] = Linear(
                in_dims=c.d_model,
                out_dims=c.tgt_vocab_size,
                bias=True,
                in_axes=("embed",),
                out_axes=("vocab",),
                dtype=c.dtype,
            )
        if c.copy_source:
            parts["copy"] = self.pointer
        return parts

    def init(self, key: torch.Tensor) -> Params:
        k_parts, k_core = random.split(key)
        return {**init_all(self._parts(), k_parts), **self.core.init(k_core)}

    def axes(self) -> Params:
        return {**axes_of(self._parts()), **self.core.axes()}

    def embed(
        self,
        params: Params,
        side: str,
        ids: torch.Tensor,
        key: torch.Tensor | None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``sqrt(d) E[ids] + P[positions]`` (``E[ids] + P`` without ``scale_embedding``), with
        positions ``0..T-1`` unless given (a decoding step gives its own) and dropout under
        ``key``."""
        c, parts = self.config, self._parts()
        vocab = c.src_vocab_size if side == "src" else c.tgt_vocab_size
        check_ids(f"{side} tokens", ids, c.max_seq_len, vocab)
        table = "tgt_embed" if c.share_embeddings else f"{side}_embed"
        h = parts[table].apply(params[table], ids)
        if c.scale_embedding:
            h = h * math.sqrt(c.d_model)
        pos = positions_like(ids) if positions is None else positions
        if c.positions == "learned":
            h = h + parts[f"{side}_pos"].apply(params[f"{side}_pos"], pos)
        else:
            h = h + sinusoidal(pos, c.d_model).to(h.dtype)
        return dropout(h, c.dropout, key=key)

    def encode(
        self,
        params: Params,
        src: torch.Tensor,
        *,
        src_valid: torch.Tensor | None = None,
        key: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Source ids ``(..., S)`` to the memory ``(..., S, d_model)``."""
        check_like("src_valid", src_valid, "src", src)
        k_embed, k_enc = maybe_split(key)
        mask = None if src_valid is None else key_padding_mask(src_valid)
        h = self.embed(params, "src", src, k_embed)
        return self.core.encoder.apply(params["encoder"], h, mask=mask, key=k_enc)

    def decode(
        self,
        params: Params,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        *,
        src: torch.Tensor | None = None,
        src_valid: torch.Tensor | None = None,
        tgt_valid: torch.Tensor | None = None,
        key: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Target ids ``(..., T)`` and the memory to logits ``(..., T, tgt_vocab)``; with
        ``copy_source`` the source ids ``src`` are needed too, and the result is ``log p``."""
        check_like("tgt_valid", tgt_valid, "tgt", tgt)
        if self.config.copy_source and src is None:
            raise ValueError("Transformer.decode: a copy_source model needs the source ids src=")
        k_embed, k_dec = maybe_split(key)
        h = self.embed(params, "tgt", tgt, k_embed)
        h = self.core.decoder.apply(
            params["decoder"],
            h,
            memory,
            causal=True,
            mask=None if tgt_valid is None else key_padding_mask(tgt_valid),
            memory_mask=None if src_valid is None else key_padding_mask(src_valid),
            key=k_dec,
        )
        copy = self.copy_context(params, memory, cast(torch.Tensor, src))
        return self.output(params, h, copy, src_valid)

    def copy_context(
        self, params: Params, memory: torch.Tensor, src: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """What the copy head reads of a source, once per source (a decoding cache keeps it):
        its keys of the memory and the source ids; ``()`` without ``copy_source``."""
        if not self.config.copy_source:
            return ()
        return self.pointer.keys(params["copy"], memory), src

    def output(
        self,
        params: Params,
        h: torch.Tensor,
        copy: tuple[torch.Tensor, ...] = (),
        src_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """What the decoder returns for its final states ``h``: the logits, or with
        ``copy_source`` ``log p``, mixed with copying from the source (``copy`` from
        :meth:`copy_context`)."""
        logits = self.logits(params, h)
        if not self.config.copy_source:
            return logits
        keys, src = copy
        return self.pointer.apply(params["copy"], logits, h, keys, src, src_valid)

    def logits(self, params: Params, h: torch.Tensor) -> torch.Tensor:
        """Decoder states to logits: tied to the target embedding, or the ``out`` projection."""
        if self.config.tie_output:
            return Embedding.attend(params["tgt_embed"], h)
        return self._parts()["out"].apply(params["out"], h)

    @property
    def pointer(self) -> Pointer:
        """The copy head of a ``copy_source`` model (its params are ``params["copy"]``)."""
        return Pointer(d_model=self.config.d_model, dtype=self.config.dtype)

    def stages(self, n_stages: int) -> list[Stage]:
        """The model cut into ``n_stages`` pipeline stages over its encoder blocks, then its
        decoder blocks (:mod:`functional_llm.models.stages`). Each stage takes and returns two
        activations, ``(source side, target side)``: the first stage embeds ``(src, tgt)``, the
        one that starts the decoder turns the source side into the memory (the encoder's final
        norm), the last returns the logits. No padding masks; stages run without dropout."""
        c = self.config
        if c.dropout:
            raise ValueError("Transformer.stages: pipeline stages run without keys; use inference")
        if c.copy_source:
            raise ValueError("Transformer.stages: the copy head needs the source ids at the last "
                             "stage, which pipeline stages do not pass on")  # fmt: skip
        core, n_enc = self.core, c.num_encoder_layers
        out = ("tgt_embed",) if c.tie_output else ("out",)
        stages = []
        for s, layers in enumerate(block_ranges(n_enc + c.num_decoder_layers, n_stages)):
            first, last = s == 0, s == n_stages - 1
            enc = range(layers.start, min(layers.stop, n_enc))
            dec = range(max(layers.start, n_enc) - n_enc, layers.stop - n_enc)
            names = ("src_embed", "tgt_embed", "src_pos", "tgt_pos") if first else ()
            names += out if last else ()

            def select(
                params: Params,
                names: tuple = names,
                enc: range = enc,
                dec: range = dec,
                starts_decoder: bool = n_enc in layers,
                last: bool = last,
            ) -> Params:
                own: Params = {n: params[n] for n in dict.fromkeys(names) if n in params}
                own["encoder"] = {"blocks": [params["encoder"]["blocks"][i] for i in enc]}
                own["decoder"] = {"blocks": [params["decoder"]["blocks"][i] for i in dec]}
                if starts_decoder and c.final_norm:
                    own["encoder"]["norm"] = params["encoder"]["norm"]
                if last and c.final_norm:
                    own["decoder"]["norm"] = params["decoder"]["norm"]
                return own

            def apply(
                p: Params,
                src: torch.Tensor,
                tgt: torch.Tensor,
                first: bool = first,
                last: bool = last,
                starts_decoder: bool = n_enc in layers,
            ) -> Any:
                if first:
                    src, tgt = self.embed(p, "src", src, None), self.embed(p, "tgt", tgt, None)
                for block_params in p["encoder"]["blocks"]:
                    src = core.encoder.block.apply(block_params, src)
                if starts_decoder:
                    src = core.encoder.finish(p["encoder"], src)  # the memory from here on
                for block_params in p["decoder"]["blocks"]:
                    tgt = core.decoder.block.apply(block_params, tgt, src, causal=True)
                if not last:
                    return src, tgt
                return self.logits(p, core.decoder.finish(p["decoder"], tgt))

            shared = ("tgt_embed",) if c.tie_output and n_stages > 1 and (first or last) else ()
            blocks = (("encoder.blocks", enc), ("decoder.blocks", dec))
            stages.append(Stage(select, apply, shared, blocks))
        return stages

    def apply(
        self,
        params: Params,
        src: torch.Tensor,
        tgt: torch.Tensor,
        *,
        src_valid: torch.Tensor | None = None,
        tgt_valid: torch.Tensor | None = None,
        key: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits ``(..., T, tgt_vocab)``: position ``t`` sees ``tgt[..., :t+1]``
        and the whole (unpadded) source."""
        self.check(params)
        k_enc, k_dec = maybe_split(key)
        memory = self.encode(params, src, src_valid=src_valid, key=k_enc)
        return self.decode(
            params, tgt, memory, src=src, src_valid=src_valid, tgt_valid=tgt_valid, key=k_dec
        )
