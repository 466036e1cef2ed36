"""Marian (``MarianMTModel``, the Opus-MT translation models) onto :class:`Transformer`.

Why Marian and not BART: both are post-LN encoder-decoders without final layer norms, but BART
adds a LayerNorm on the embeddings and learned positions offset by two, where Marian is the
original Transformer with fixed sinusoids. Marian needs two switches of
:class:`TransformerConfig` (``final_norm=False``; ``scale_embedding`` for its config field of
that name), BART would need three.

Marian's sinusoids lay out all sines, then all cosines (ours interleave them), so a loaded model
holds them as ``positions="learned"`` tables; they equal Marian's fixed ones, which :func:`save`
checks (freeze them when fine-tuning, e.g. with ``tree.partition``). The output layer is the
decoder embedding plus ``final_logits_bias``, so it loads as the untied ``out`` projection.

Name table, ours <- theirs (``model.`` prefix; ``{s}`` is encoder or decoder)::

    src_embed / tgt_embed           shared (or {s}.embed_tokens when not shared)
    src_pos / tgt_pos               (computed sinusoids, not stored)
    {s}.blocks.{i}.attn             {s}.layers.{i}.self_attn.{q,k,v,out}_proj
    {s}.blocks.{i}.attn_norm        {s}.layers.{i}.self_attn_layer_norm
    decoder.blocks.{i}.cross        decoder.layers.{i}.encoder_attn.{q,k,v,out}_proj
    decoder.blocks.{i}.cross_norm   decoder.layers.{i}.encoder_attn_layer_norm
    {s}.blocks.{i}.mlp.up / down    {s}.layers.{i}.fc1 / fc2
    {s}.blocks.{i}.mlp_norm         {s}.layers.{i}.final_layer_norm
    out.w / out.b                   lm_head (tied to the decoder embedding) / final_logits_bias
"""

from __future__ import annotations

from typing import Any

import torch

from functional_llm.interop.hf.bert import _dense, _norm
from functional_llm.interop.hf.family import Family, field_value, require, same_tensor
from functional_llm.interop.hf.mapping import MappingError, Rule, rule
from functional_llm.models import Transformer, TransformerConfig

__all__ = ["MARIAN", "marian_positions"]

_ACT = {"swish": "silu", "silu": "silu", "gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh"}
_ENC, _DEC = "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"
_POS = {
    "src_pos": "model.encoder.embed_positions.weight",
    "tgt_pos": "model.decoder.embed_positions.weight",
}


def marian_positions(n: int, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Marian's fixed table ``(n, dim)``: ``sin(p w_i)`` in the first half, ``cos(p w_i)`` in the
    second, ``w_i = 10000^(-2i/dim)``, computed in float64 as Marian does."""
    p = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)
    angles = p / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    half = (dim + 1) // 2
    return torch.cat([angles[:, 0::2].sin()[:, :half], angles[:, 1::2].cos()], dim=1).to(dtype)


def _config(hf: dict[str, Any]) -> TransformerConfig:
    for side in ("attention_heads", "ffn_dim"):
        if hf.get(f"encoder_{side}") != hf.get(f"decoder_{side}"):
            raise MappingError(
                f"config.json: encoder_{side}={hf.get(f'encoder_{side}')} differs from "
                f"decoder_{side}={hf.get(f'decoder_{side}')}; our Transformer has one of each"
            )
    require(hf, "normalize_before", (False,), False)
    act = require(hf, "activation_function", _ACT, "gelu")
    return TransformerConfig(
        src_vocab_size=hf["vocab_size"],
        tgt_vocab_size=field_value(hf, "decoder_vocab_size", hf["vocab_size"]),
        d_model=hf["d_model"],
        nhead=hf["encoder_attention_heads"],
        num_encoder_layers=hf["encoder_layers"],
        num_decoder_layers=hf["decoder_layers"],
        dim_feedforward=hf["encoder_ffn_dim"],
        dropout=field_value(hf, "dropout", 0.1),
        activation=_ACT[act],  # type: ignore[arg-type]
        max_seq_len=field_value(hf, "max_position_embeddings", 1024),
        positions="learned",
        final_norm=False,
        scale_embedding=field_value(hf, "scale_embedding", False),
    )


def _to_hf(c: TransformerConfig) -> dict[str, Any]:
    fields = {
        "norm_first": False,
        "final_norm": False,
        "positions": "learned",
        "tie_output": False,
        "share_embeddings": False,
    }
    for name, want in fields.items():
        if getattr(c, name) != want:
            raise MappingError(
                f"TransformerConfig.{name}={getattr(c, name)!r}: Marian needs {want!r}"
            )
    act = {"silu": "swish", "gelu": "gelu", "relu": "relu", "gelu_tanh": "gelu_new"}
    if c.activation not in act:
        raise MappingError(
            f"TransformerConfig.activation={c.activation!r}: Marian has no gated MLP"
        )
    return {
        "vocab_size": c.src_vocab_size,
        "decoder_vocab_size": c.tgt_vocab_size,
        "d_model": c.d_model,
        "encoder_attention_heads": c.nhead,
        "decoder_attention_heads": c.nhead,
        "encoder_layers": c.num_encoder_layers,
        "decoder_layers": c.num_decoder_layers,
        "encoder_ffn_dim": c.dim_feedforward,
        "decoder_ffn_dim": c.dim_feedforward,
        "activation_function": act[c.activation],
        "dropout": c.dropout,
        "max_position_embeddings": c.max_seq_len,
        "scale_embedding": c.scale_embedding,
    }


def _attention(ours: str, hf: str) -> list[Rule]:
    rules = [r for x in "qkv" for r in _dense(f"{ours}.{x}", f"{hf}.{x}_proj")]
    return rules + _dense(f"{ours}.o", f"{hf}.out_proj", n_in=2)


def _rules(c: TransformerConfig) -> list[Rule]:
    rules = [
        rule("src_embed.table", _ENC),
        rule("tgt_embed.table", _DEC),
        rule("out.w", "lm_head.weight", linear=True),
        rule("out.b", "final_logits_bias", row=True),
        *(rule(f"{ours}.table", hf) for ours, hf in _POS.items()),
    ]
    for side, n in (("encoder", c.num_encoder_layers), ("decoder", c.num_decoder_layers)):
        for i in range(n):
            ours, hf = f"{side}.blocks.{i}.", f"model.{side}.layers.{i}."
            rules += [
                *_attention(f"{ours}attn", f"{hf}self_attn"),
                *_norm(f"{ours}attn_norm", f"{hf}self_attn_layer_norm"),
                *_dense(f"{ours}mlp.up", f"{hf}fc1"),
                *_dense(f"{ours}mlp.down", f"{hf}fc2"),
                *_norm(f"{ours}mlp_norm", f"{hf}final_layer_norm"),
            ]
            if side == "decoder":
                rules += _attention(f"{ours}cross", f"{hf}encoder_attn")
                rules += _norm(f"{ours}cross_norm", f"{hf}encoder_attn_layer_norm")
    return rules


def _untie(tensors: dict, hf: dict[str, Any]) -> dict:
    """Fill in what Marian ties or computes: the embeddings from ``shared``, the output layer
    from the decoder embedding, the position tables."""
    t = dict(tensors)
    shared = t.pop("model.shared.weight", None)
    for name in (_ENC, _DEC):
        if name not in t and shared is not None:
            t[name] = shared
    if field_value(hf, "tie_word_embeddings", True) and _DEC in t:
        if "lm_head.weight" in t and not same_tensor(t["lm_head.weight"], t[_DEC]):
            raise MappingError(
                "config.json ties lm_head.weight to the decoder embedding, but it differs"
            )
        t["lm_head.weight"] = t[_DEC]
    table = marian_positions(field_value(hf, "max_position_embeddings", 1024), hf["d_model"])
    dtype = next(iter(t.values())).dtype
    return {**t, **{name: table.to(dtype) for name in _POS.values()}}


def _tie(tensors: dict, c: TransformerConfig) -> tuple[dict, dict[str, Any]]:
    t = dict(tensors)
    for ours, name in _POS.items():
        table = t.pop(name)
        fixed = marian_positions(table.shape[0], table.shape[1], torch.float64)
        if not torch.allclose(table.double(), fixed, atol=1e-6, rtol=0):
            raise MappingError(
                f"{ours}.table is not Marian's fixed sinusoid table (trained?); Marian cannot "
                "store it"
            )
    decoder_embed = t[_DEC]
    shared = same_tensor(t[_ENC], decoder_embed)
    if shared:
        t["model.shared.weight"] = t.pop(_ENC)
        del t[_DEC]
    tied = same_tensor(t["lm_head.weight"], decoder_embed)
    if tied:
        del t["lm_head.weight"]
    # Marian's special ids unless save() is given others: eos 0, pad (= decoder start) the last id
    pad = c.tgt_vocab_size - 1
    ids = {"eos_token_id": 0, "pad_token_id": pad, "decoder_start_token_id": pad}
    return t, {"share_encoder_decoder_embeddings": shared, "tie_word_embeddings": tied, **ids}


MARIAN = Family(
    model_type="marian",
    architecture="MarianMTModel",
    prefix="model.",
    config_from_hf=_config,
    config_to_hf=_to_hf,
    make_model=Transformer,
    rules=_rules,
    ignore=(r"model\.shared\.weight",),
    untie=_untie,
    tie=_tie,
)
