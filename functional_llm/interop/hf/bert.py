"""BERT with its pretraining heads (``BertForPreTraining``) onto :class:`BERT`.

Name table, ours <- theirs (``bert.`` prefix; ``{i}`` is the layer)::

    embed.table / pos.table / types.table   embeddings.{word,position,token_type}_embeddings
    embed_norm                              embeddings.LayerNorm
    blocks.{i}.attn.{q,k,v}                 encoder.layer.{i}.attention.self.{query,key,value}
    blocks.{i}.attn.o                       encoder.layer.{i}.attention.output.dense
    blocks.{i}.attn_norm                    encoder.layer.{i}.attention.output.LayerNorm
    blocks.{i}.mlp.up / mlp.down            encoder.layer.{i}.intermediate.dense / output.dense
    blocks.{i}.mlp_norm                     encoder.layer.{i}.output.LayerNorm
    pooler                                  pooler.dense
    mlm.transform / mlm.norm / mlm.bias     cls.predictions.transform.dense / .LayerNorm / .bias
    nsp                                     cls.seq_relationship

The MLM decoder is tied to the word embeddings (``cls.predictions.decoder.weight``, when a
file has it, must equal them). Old checkpoints name LayerNorm parameters ``gamma``/``beta``.
"""

from __future__ import annotations

from typing import Any

from functional_llm.interop.hf.family import Family, field_value, require, same_tensor
from functional_llm.interop.hf.mapping import MappingError, Rule, rule
from functional_llm.models import BERT, BERTConfig

__all__ = ["BERT_FAMILY"]

_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def _config(hf: dict[str, Any]) -> BERTConfig:
    require(hf, "position_embedding_type", ("absolute",), "absolute")
    require(hf, "is_decoder", (False,), False)
    require(hf, "add_cross_attention", (False,), False)
    act = require(hf, "hidden_act", _ACT, "gelu")
    return BERTConfig(
        vocab_size=hf["vocab_size"],
        max_seq_len=field_value(hf, "max_position_embeddings", 512),
        type_vocab_size=field_value(hf, "type_vocab_size", 2),
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        d_ff=hf["intermediate_size"],
        activation=_ACT[act],  # type: ignore[arg-type]
        dropout=field_value(hf, "hidden_dropout_prob", 0.1),
        norm_eps=field_value(hf, "layer_norm_eps", 1e-12),
        init_std=field_value(hf, "initializer_range", 0.02),
    )


def _to_hf(c: BERTConfig) -> dict[str, Any]:
    act = {v: k for k, v in reversed(_ACT.items())}
    return {
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_seq_len,
        "type_vocab_size": c.type_vocab_size,
        "hidden_size": c.d_model,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "intermediate_size": c.d_ff,
        "hidden_act": act[c.activation],
        "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": c.dropout,
        "layer_norm_eps": c.norm_eps,
        "initializer_range": c.init_std,
        "position_embedding_type": "absolute",
    }


def _norm(ours: str, hf: str) -> list[Rule]:
    return [rule(f"{ours}.scale", f"{hf}.weight"), rule(f"{ours}.bias", f"{hf}.bias")]


def _dense(ours: str, hf: str, n_in: int = 1) -> list[Rule]:
    return [
        rule(f"{ours}.w", f"{hf}.weight", linear=True, n_in=n_in),
        rule(f"{ours}.b", f"{hf}.bias"),
    ]


def _rules(c: BERTConfig) -> list[Rule]:
    emb = "bert.embeddings."
    rules = [
        rule("embed.table", f"{emb}word_embeddings.weight"),
        rule("pos.table", f"{emb}position_embeddings.weight"),
        rule("types.table", f"{emb}token_type_embeddings.weight"),
        *_norm("embed_norm", f"{emb}LayerNorm"),
        *_dense("pooler", "bert.pooler.dense"),
        *_dense("mlm.transform", "cls.predictions.transform.dense"),
        *_norm("mlm.norm", "cls.predictions.transform.LayerNorm"),
        rule("mlm.bias", "cls.predictions.bias"),
        *_dense("nsp", "cls.seq_relationship"),
    ]
    for i in range(c.n_layers):
        ours, hf = f"blocks.{i}.", f"bert.encoder.layer.{i}."
        for x, name in zip("qkv", ("query", "key", "value"), strict=True):
            rules += _dense(f"{ours}attn.{x}", f"{hf}attention.self.{name}")
        rules += [
            *_dense(f"{ours}attn.o", f"{hf}attention.output.dense", n_in=2),
            *_norm(f"{ours}attn_norm", f"{hf}attention.output.LayerNorm"),
            *_dense(f"{ours}mlp.up", f"{hf}intermediate.dense"),
            *_dense(f"{ours}mlp.down", f"{hf}output.dense"),
            *_norm(f"{ours}mlp_norm", f"{hf}output.LayerNorm"),
        ]
    return rules


def _untie(tensors: dict, hf: dict[str, Any]) -> dict:
    renamed = {}
    for name, t in tensors.items():  # TF-era names: LayerNorm.gamma / .beta
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight")
        renamed[name.replace("LayerNorm.beta", "LayerNorm.bias")] = t
    word = renamed.get("bert.embeddings.word_embeddings.weight")
    copies = {
        "cls.predictions.decoder.weight": word,
        "cls.predictions.decoder.bias": renamed.get("cls.predictions.bias"),
    }
    for name, original in copies.items():
        if name in renamed and original is not None and not same_tensor(renamed[name], original):
            raise MappingError(f"{name} is tied in BERT but differs from the tensor it copies")
    return renamed


BERT_FAMILY = Family(
    model_type="bert",
    architecture="BertForPreTraining",
    prefix="bert.",
    config_from_hf=_config,
    config_to_hf=_to_hf,
    make_model=BERT,
    rules=_rules,
    ignore=(r"bert\.embeddings\.position_ids", r"cls\.predictions\.decoder\.(weight|bias)"),
    untie=_untie,
)
