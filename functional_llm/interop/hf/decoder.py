"""GPT-2 (``GPT2LMHeadModel``) and Llama (``LlamaForCausalLM``) onto :class:`GPT`.

Name tables, ours <- theirs (``{i}`` is the block). GPT-2 (prefix ``transformer.``)::

    embed.table / pos.table         wte / wpe
    blocks.{i}.attn_norm            h.{i}.ln_1
    blocks.{i}.attn.{q,k,v}         h.{i}.attn.c_attn (fused)
    blocks.{i}.attn.o               h.{i}.attn.c_proj
    blocks.{i}.mlp_norm             h.{i}.ln_2
    blocks.{i}.mlp.up / down        h.{i}.mlp.c_fc / c_proj
    norm                            ln_f
    unembed.w                       lm_head (untied only)

Llama (prefix ``model.``)::

    embed.table                     embed_tokens (rotary positions: nothing stored)
    blocks.{i}.attn_norm            layers.{i}.input_layernorm
    blocks.{i}.attn.{q,k,v,o}       layers.{i}.self_attn.{q,k,v,o}_proj
    blocks.{i}.mlp_norm             layers.{i}.post_attention_layernorm
    blocks.{i}.mlp.{gate,up,down}   layers.{i}.mlp.{gate,up,down}_proj
    norm                            norm
    unembed.w                       lm_head (untied only)

GPT-2 keeps q, k and v in one ``Conv1D`` stored ``(in, out)``; Llama's projections are
``torch.nn.Linear``, stored ``(out, in)``. Hugging Face's Llama weights already use the
half-split rotary layout that :func:`functional_llm.nn.positions.rope` implements.
"""

from __future__ import annotations

from typing import Any

from functional_llm.interop.hf.family import Family, field_value, require, same_tensor
from functional_llm.interop.hf.mapping import MappingError, Rule, rule
from functional_llm.models import GPT, GPTConfig
from functional_llm.nn.positions import RopeScaling

__all__ = ["GPT2", "LLAMA"]

_GPT2_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_GPT2_ACT |= {"relu": "relu", "silu": "silu", "swish": "silu"}


def _gpt2_config(hf: dict[str, Any]) -> GPTConfig:
    require(hf, "scale_attn_weights", (True,), True)
    require(hf, "scale_attn_by_inverse_layer_idx", (False,), False)
    require(hf, "add_cross_attention", (False,), False)
    act = require(hf, "activation_function", _GPT2_ACT, "gelu_new")
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        max_seq_len=field_value(hf, "n_positions", 1024),
        d_model=hf["n_embd"],
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        d_ff=hf.get("n_inner"),
        activation=_GPT2_ACT[act],  # type: ignore[arg-type]
        norm_eps=field_value(hf, "layer_norm_epsilon", 1e-5),
        tie_embeddings=field_value(hf, "tie_word_embeddings", True),
        dropout=field_value(hf, "resid_pdrop", 0.1),
        init_std=field_value(hf, "initializer_range", 0.02),
    )


def _gpt2_to_hf(c: GPTConfig) -> dict[str, Any]:
    _refuse_unless(c, "GPT-2", positions="learned", norm="layernorm", bias=True)
    if c.n_kv_heads not in (None, c.n_heads):
        raise MappingError("GPTConfig.n_kv_heads: GPT-2 has no grouped-query attention")
    if c.dim_per_head * c.n_heads != c.d_model:
        raise MappingError("GPTConfig.head_dim: GPT-2's heads split d_model exactly")
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
    if c.activation not in act:
        raise MappingError(f"GPTConfig.activation={c.activation!r}: GPT-2 has no gated MLP")
    p = c.dropout
    return {
        "vocab_size": c.vocab_size,
        "n_positions": c.max_seq_len,
        "n_embd": c.d_model,
        "n_layer": c.n_layers,
        "n_head": c.n_heads,
        "n_inner": c.ffn_dim,
        "activation_function": act[c.activation],
        "layer_norm_epsilon": c.norm_eps,
        "tie_word_embeddings": c.tie_embeddings,
        "resid_pdrop": p,
        "embd_pdrop": p,
        "attn_pdrop": p,
        "initializer_range": c.init_std,
    }


def _gpt2_rules(c: GPTConfig) -> list[Rule]:
    rules = [
        rule("embed.table", "transformer.wte.weight"),
        rule("pos.table", "transformer.wpe.weight"),
        rule("norm.scale", "transformer.ln_f.weight"),
        rule("norm.bias", "transformer.ln_f.bias"),
    ]
    if not c.tie_embeddings:
        rules.append(rule("unembed.w", "lm_head.weight", linear=True))
    for i in range(c.n_layers):
        ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
        qkv = [f"{ours}attn.{x}" for x in "qkv"]
        rules += [
            rule(tuple(f"{p}.w" for p in qkv), f"{hf}attn.c_attn.weight"),
            rule(tuple(f"{p}.b" for p in qkv), f"{hf}attn.c_attn.bias"),
            rule(f"{ours}attn.o.w", f"{hf}attn.c_proj.weight", n_in=2),
            rule(f"{ours}attn.o.b", f"{hf}attn.c_proj.bias"),
            rule(f"{ours}mlp.up.w", f"{hf}mlp.c_fc.weight"),
            rule(f"{ours}mlp.up.b", f"{hf}mlp.c_fc.bias"),
            rule(f"{ours}mlp.down.w", f"{hf}mlp.c_proj.weight"),
            rule(f"{ours}mlp.down.b", f"{hf}mlp.c_proj.bias"),
        ]
        for norm, ln in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            rules += [
                rule(f"{ours}{norm}.scale", f"{hf}{ln}.weight"),
                rule(f"{ours}{norm}.bias", f"{hf}{ln}.bias"),
            ]
    return rules


def _llama_config(hf: dict[str, Any]) -> GPTConfig:
    require(hf, "hidden_act", ("silu",), "silu")
    require(hf, "attention_bias", (False,), False)
    require(hf, "mlp_bias", (False,), False)
    rope = {
        **(field_value(hf, "rope_scaling", {}) or {}),
        **(field_value(hf, "rope_parameters", {}) or {}),
    }
    scaling = _rope_scaling(rope, hf)
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = field_value(hf, "head_dim", d // heads)
    return GPTConfig.llama(
        vocab_size=hf["vocab_size"],
        max_seq_len=field_value(hf, "max_position_embeddings", 2048),
        d_model=d,
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=field_value(hf, "num_key_value_heads", heads),
        head_dim=None if head_dim * heads == d else head_dim,
        d_ff=hf["intermediate_size"],
        norm_eps=field_value(hf, "rms_norm_eps", 1e-6),
        rope_theta=float(field_value(hf, "rope_theta", rope.get("rope_theta", 10000.0))),
        rope_scaling=scaling,
        tie_embeddings=field_value(hf, "tie_word_embeddings", False),
        dropout=field_value(hf, "attention_dropout", 0.0),
        init_std=field_value(hf, "initializer_range", 0.02),
    )


def _rope_scaling(rope: dict[str, Any], hf: dict[str, Any]) -> RopeScaling | None:
    """``rope_parameters`` (transformers 5) or ``rope_scaling`` (4.x) as our RopeScaling."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("linear", "llama3"):
        raise MappingError(
            f"config.json: rope_type={kind!r} is not supported ('default', 'linear', 'llama3')"
        )
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(rope["factor"]))
    return RopeScaling(
        kind="llama3",
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_len=int(rope["original_max_position_embeddings"]),
    )


def _llama_to_hf(c: GPTConfig) -> dict[str, Any]:
    _refuse_unless(c, "Llama", positions="rope", norm="rmsnorm", activation="swiglu", bias=False)
    return {
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_seq_len,
        "hidden_size": c.d_model,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads or c.n_heads,
        "head_dim": c.dim_per_head,
        "intermediate_size": c.ffn_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.norm_eps,
        "rope_parameters": {"rope_theta": c.rope_theta, **_rope_fields(c.rope_scaling)},
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": c.dropout,
        "initializer_range": c.init_std,
    }


def _rope_fields(scaling: RopeScaling | None) -> dict[str, Any]:
    if scaling is None:
        return {"rope_type": "default"}
    fields: dict[str, Any] = {"rope_type": scaling.kind, "factor": scaling.factor}
    if scaling.kind == "llama3":
        fields |= {
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_len,
        }
    return fields


def _llama_rules(c: GPTConfig) -> list[Rule]:
    rules = [
        rule("embed.table", "model.embed_tokens.weight"),
        rule("norm.scale", "model.norm.weight"),
    ]
    if not c.tie_embeddings:
        rules.append(rule("unembed.w", "lm_head.weight", linear=True))
    for i in range(c.n_layers):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        rules += [
            rule(f"{ours}attn.{x}.w", f"{hf}self_attn.{x}_proj.weight", linear=True) for x in "qkv"
        ]
        rules += [
            rule(f"{ours}attn.o.w", f"{hf}self_attn.o_proj.weight", linear=True, n_in=2),
            rule(f"{ours}attn_norm.scale", f"{hf}input_layernorm.weight"),
            rule(f"{ours}mlp_norm.scale", f"{hf}post_attention_layernorm.weight"),
        ]
        rules += [
            rule(f"{ours}mlp.{x}.w", f"{hf}mlp.{x}_proj.weight", linear=True)
            for x in ("gate", "up", "down")
        ]
    return rules


def _check_tied(name: str, embed: str, tied_by_default: bool) -> Any:
    """A tied model's checkpoint may repeat the embedding as the output layer; it must equal it."""

    def untie(tensors: dict, hf: dict[str, Any]) -> dict:
        tied = field_value(hf, "tie_word_embeddings", tied_by_default)
        if tied and name in tensors and not same_tensor(tensors[name], tensors[embed]):
            raise MappingError(
                f"config.json ties the output layer to the embedding, but {name} differs "
                f"from {embed}"
            )
        return tensors

    return untie


def _refuse_unless(c: GPTConfig, family: str, **fields: Any) -> None:
    for name, want in fields.items():
        if getattr(c, name) != want:
            raise MappingError(f"GPTConfig.{name}={getattr(c, name)!r}: {family} needs {want!r}")


GPT2 = Family(
    model_type="gpt2",
    architecture="GPT2LMHeadModel",
    prefix="transformer.",
    config_from_hf=_gpt2_config,
    config_to_hf=_gpt2_to_hf,
    make_model=GPT,
    rules=_gpt2_rules,
    ignore=(r"transformer\.h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight"),
    untie=_check_tied("lm_head.weight", "transformer.wte.weight", tied_by_default=True),
)

LLAMA = Family(
    model_type="llama",
    architecture="LlamaForCausalLM",
    prefix="model.",
    config_from_hf=_llama_config,
    config_to_hf=_llama_to_hf,
    make_model=GPT,
    rules=_llama_rules,
    ignore=(r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq", r"lm_head\.weight"),
    untie=_check_tied("lm_head.weight", "model.embed_tokens.weight", tied_by_default=False),
)
