"""Convert ``torch.nn`` Transformer modules to functional_llm layers and params, and back.

``from_*`` functions return ``(layer, params)`` whose ``apply`` equals the module's forward in
eval mode; the params are fresh copies (later changes to the module don't reach them).
``to_*`` functions build the equivalent ``torch.nn`` module. Layout differences:

* ``torch.nn`` linear weights are ``(out, in)``; ours are ``(in, *out)`` (``x @ W``), with
  attention projections split per head: ``q: (d_model, heads, head_dim)``,
  ``o: (heads, head_dim, d_model)``.
* ``torch.nn`` masks are True where attention is *forbidden* (``key_padding_mask``, boolean
  ``attn_mask``); ours are True where it is allowed. :func:`mask_from_torch` converts.
* Our layers are batch-first with any number of leading dims; ``batch_first=False`` modules
  take ``(T, B, d)``, so transpose at the boundary.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from functional_llm.nn import (
    Block,
    Decoder,
    DecoderBlock,
    EncoderDecoder,
    MultiHeadAttention,
    Stack,
)
from functional_llm.nn.module import Params

__all__ = [
    "from_decoder_layer",
    "from_encoder_layer",
    "from_multihead_attention",
    "from_transformer",
    "mask_from_torch",
    "to_decoder_layer",
    "to_encoder_layer",
    "to_multihead_attention",
    "to_transformer",
]


M = TypeVar("M", bound=nn.Module)


def _as(child: object, kind: type[M]) -> M:
    """A sub-module of a torch module, checked to be the ``kind`` this converter reads."""
    if not isinstance(child, kind):
        raise TypeError(f"expected a {kind.__name__} here, got {type(child).__name__}")
    return child


def mask_from_torch(
    attn_mask: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor | None:
    """torch's ``attn_mask`` (``(T, S)`` boolean, True = forbidden, or additive float with
    ``-inf``) and ``key_padding_mask`` (``(B, S)``, True = padding) to our boolean mask."""
    allowed = None
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        finite = attn_mask[attn_mask != float("-inf")]
        if (finite != 0).any():
            raise ValueError(
                "an additive attn_mask with values other than 0 and -inf is a bias, not a mask"
            )
    if attn_mask is not None:
        allowed = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask != float("-inf")
    if key_padding_mask is not None:
        pad = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask != 0
        keys = (~pad)[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
    return allowed


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


def _linear(linear: nn.Linear) -> Params:
    params = {"w": _copy(linear.weight.T)}
    if linear.bias is not None:
        params["b"] = _copy(linear.bias)
    return params


def _norm(norm: nn.LayerNorm) -> Params:
    params = {"scale": _copy(norm.weight)}
    if norm.bias is not None:
        params["bias"] = _copy(norm.bias)
    return params


def from_multihead_attention(mha: nn.MultiheadAttention) -> tuple[MultiHeadAttention, Params]:
    """``nn.MultiheadAttention`` to :class:`MultiHeadAttention` and its params."""
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("add_bias_kv and add_zero_attn have no equivalent in MultiHeadAttention")
    if mha.kdim != mha.vdim:
        raise ValueError(f"kdim ({mha.kdim}) and vdim ({mha.vdim}) must be equal")
    d, h = mha.embed_dim, mha.num_heads
    hd = d // h
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bias = mha.in_proj_bias is not None
    layer = MultiHeadAttention(
        d_model=d,
        n_heads=h,
        kv_dim=None if mha.kdim == d else mha.kdim,
        bias=bias,
        dropout=mha.dropout,
        dtype=w_q.dtype,
    )
    params = {
        name: {"w": _copy(w.T.reshape(w.shape[1], h, hd))}
        for name, w in zip("qkv", (w_q, w_k, w_v), strict=True)
    }
    params["o"] = {"w": _copy(mha.out_proj.weight.T.reshape(h, hd, d))}
    if bias:
        for name, b in zip("qkv", mha.in_proj_bias.chunk(3), strict=True):
            params[name]["b"] = _copy(b.reshape(h, hd))
        params["o"]["b"] = _copy(mha.out_proj.bias)
    return layer, params


def to_multihead_attention(
    layer: MultiHeadAttention, params: Params, batch_first: bool = True
) -> nn.MultiheadAttention:
    """The ``nn.MultiheadAttention`` equal to ``layer`` with ``params`` (plain MHA only)."""
    if (
        layer.kv_heads != layer.n_heads
        or layer.rope_theta is not None
        or layer.head_dim not in (None, layer.d_model // layer.n_heads)
    ):
        raise ValueError(
            "only plain multi-head attention (no GQA/MQA, rotary or custom head_dim) converts"
        )
    d = layer.d_model
    kdim = layer.kv_dim or d
    mha = nn.MultiheadAttention(
        d,
        layer.n_heads,
        dropout=layer.dropout,
        bias=layer.bias,
        kdim=kdim,
        vdim=kdim,
        batch_first=batch_first,
        dtype=params["q"]["w"].dtype,
    )
    weights = [params[n]["w"].reshape(-1, d).T for n in "qkv"]
    with torch.no_grad():
        if mha._qkv_same_embed_dim:
            mha.in_proj_weight.copy_(torch.cat(weights))
        else:
            for target, w in zip(
                (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight), weights, strict=True
            ):
                target.copy_(w)
        mha.out_proj.weight.copy_(params["o"]["w"].reshape(d, d).T)
        if layer.bias:
            mha.in_proj_bias.copy_(torch.cat([params[n]["b"].reshape(-1) for n in "qkv"]))
            mha.out_proj.bias.copy_(params["o"]["b"])
    return mha


def _activation_name(activation: object) -> str:
    if activation is F.relu or isinstance(activation, nn.ReLU):
        return "relu"
    if activation is F.gelu or (
        isinstance(activation, nn.GELU) and activation.approximate == "none"
    ):
        return "gelu"
    if isinstance(activation, nn.GELU) and activation.approximate == "tanh":
        return "gelu_tanh"
    raise ValueError(f"unsupported activation {activation!r}: use relu or gelu")


def _block_settings(layer: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer) -> dict:
    return {
        "d_model": layer.self_attn.embed_dim,
        "n_heads": layer.self_attn.num_heads,
        "d_ff": layer.linear1.out_features,
        "activation": _activation_name(layer.activation),
        "dropout": layer.dropout.p,
        "norm_first": layer.norm_first,
        "norm_eps": layer.norm1.eps,
        "bias": layer.linear1.bias is not None,
        "dtype": layer.linear1.weight.dtype,
    }


def _layer_params(layer: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer) -> Params:
    """A torch layer's params in our layout: its attentions (self, and cross in a decoder
    layer), then the MLP, each sub-layer with its norm (torch's ``norm1``, ``norm2``, ...)."""
    attentions = {"attn": layer.self_attn}
    if isinstance(layer, nn.TransformerDecoderLayer):
        attentions["cross"] = layer.multihead_attn
    params: Params = {name: from_multihead_attention(a)[1] for name, a in attentions.items()}
    for i, name in enumerate([*attentions, "mlp"], start=1):
        params[f"{name}_norm"] = _norm(_as(getattr(layer, f"norm{i}"), nn.LayerNorm))
    params["mlp"] = {"up": _linear(layer.linear1), "down": _linear(layer.linear2)}
    return params


def from_encoder_layer(layer: nn.TransformerEncoderLayer) -> tuple[Block, Params]:
    """``nn.TransformerEncoderLayer`` to :class:`Block` and its params."""
    return Block(**_block_settings(layer)), _layer_params(layer)


def from_decoder_layer(layer: nn.TransformerDecoderLayer) -> tuple[DecoderBlock, Params]:
    """``nn.TransformerDecoderLayer`` to :class:`DecoderBlock` and its params."""
    return DecoderBlock(**_block_settings(layer)), _layer_params(layer)


def from_transformer(module: nn.Transformer) -> tuple[EncoderDecoder, Params]:
    """``nn.Transformer`` to :class:`EncoderDecoder` and its params."""
    enc_layers, dec_layers = module.encoder.layers, module.decoder.layers
    if module.encoder.norm is None or module.decoder.norm is None:
        raise ValueError("expected nn.Transformer's final encoder and decoder norms")
    enc_layers = [_as(m, nn.TransformerEncoderLayer) for m in enc_layers]
    dec_layers = [_as(m, nn.TransformerDecoderLayer) for m in dec_layers]
    enc_block, _ = from_encoder_layer(enc_layers[0])
    dec_block, _ = from_decoder_layer(dec_layers[0])
    model = EncoderDecoder(
        encoder=Stack(block=enc_block, n_layers=len(enc_layers)),
        decoder=Decoder(block=dec_block, n_layers=len(dec_layers)),
    )
    params = {
        "encoder": {
            "blocks": [from_encoder_layer(m)[1] for m in enc_layers],
            "norm": _norm(_as(module.encoder.norm, nn.LayerNorm)),
        },
        "decoder": {
            "blocks": [from_decoder_layer(m)[1] for m in dec_layers],
            "norm": _norm(_as(module.decoder.norm, nn.LayerNorm)),
        },
    }
    return model, params


def _load_linear(linear: nn.Linear, params: Params) -> None:
    linear.weight.copy_(params["w"].T)
    if linear.bias is not None:
        linear.bias.copy_(params["b"])


def _load_norm(norm: nn.LayerNorm, params: Params) -> None:
    norm.weight.copy_(params["scale"])
    if norm.bias is not None:
        norm.bias.copy_(params["bias"])


def _torch_layer_kwargs(block: Block, batch_first: bool) -> dict:
    if (
        block.norm != "layernorm"
        or block.n_kv_heads not in (None, block.n_heads)
        or block.rope_theta is not None
    ):
        raise ValueError(
            "only LayerNorm blocks with plain multi-head attention convert to torch.nn"
        )
    if block.activation not in ("relu", "gelu"):
        raise ValueError(f"torch.nn layers take relu or gelu, not {block.activation!r}")
    return {
        "d_model": block.d_model,
        "nhead": block.n_heads,
        "dim_feedforward": block.d_ff,
        "dropout": block.dropout,
        "activation": block.activation,
        "layer_norm_eps": block.norm_eps,
        "batch_first": batch_first,
        "norm_first": block.norm_first,
        "bias": block.bias,
        "dtype": block.dtype,
    }


def _load_layer(module: nn.Module, block: Block, params: Params) -> None:
    """Copy ``params`` into an encoder or decoder layer built by the ``to_*`` functions."""
    with torch.no_grad():
        self_attn = to_multihead_attention(block._attention(), params["attn"])
        _as(module.self_attn, nn.Module).load_state_dict(self_attn.state_dict())
        norm_names = ["attn_norm", "mlp_norm"]
        if "cross" in params:
            cross = to_multihead_attention(block._attention(cross=True), params["cross"])
            _as(module.multihead_attn, nn.Module).load_state_dict(cross.state_dict())
            norm_names.insert(1, "cross_norm")
        for i, name in enumerate(norm_names, start=1):
            _load_norm(getattr(module, f"norm{i}"), params[name])
        _load_linear(_as(module.linear1, nn.Linear), params["mlp"]["up"])
        _load_linear(_as(module.linear2, nn.Linear), params["mlp"]["down"])


def to_encoder_layer(
    block: Block, params: Params, batch_first: bool = True
) -> nn.TransformerEncoderLayer:
    """The ``nn.TransformerEncoderLayer`` equal to ``block`` with ``params``."""
    module = nn.TransformerEncoderLayer(**_torch_layer_kwargs(block, batch_first))
    _load_layer(module, block, params)
    return module


def to_decoder_layer(
    block: DecoderBlock, params: Params, batch_first: bool = True
) -> nn.TransformerDecoderLayer:
    """The ``nn.TransformerDecoderLayer`` equal to ``block`` with ``params``."""
    module = nn.TransformerDecoderLayer(**_torch_layer_kwargs(block, batch_first))
    _load_layer(module, block, params)
    return module


def to_transformer(
    model: EncoderDecoder, params: Params, batch_first: bool = True
) -> nn.Transformer:
    """The ``nn.Transformer`` equal to ``model`` with ``params``."""
    enc, dec = model.encoder, model.decoder
    if not (enc.final_norm and dec.final_norm):
        raise ValueError("nn.Transformer always has final encoder and decoder norms")
    kwargs = _torch_layer_kwargs(enc.block, batch_first)
    module = nn.Transformer(
        num_encoder_layers=enc.n_layers, num_decoder_layers=dec.n_layers, **kwargs
    )
    for layer, p in zip(module.encoder.layers, params["encoder"]["blocks"], strict=True):
        _load_layer(layer, enc.block, p)
    for layer, p in zip(module.decoder.layers, params["decoder"]["blocks"], strict=True):
        _load_layer(layer, dec.block, p)
    with torch.no_grad():
        _load_norm(_as(module.encoder.norm, nn.LayerNorm), params["encoder"]["norm"])
        _load_norm(_as(module.decoder.norm, nn.LayerNorm), params["decoder"]["norm"])
    return module
