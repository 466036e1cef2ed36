"""Hugging Face folders in and out: random-init ``transformers`` models (built from configs, no
download) are saved, loaded into our trees and compared logit for logit, with padding; our
``save`` goes back through ``from_pretrained``; bad folders are refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import functional_llm as fl
from functional_llm.interop import hf

tr = pytest.importorskip("transformers")
tr.logging.set_verbosity_error()

TOL = 1e-4


def _gpt2(**kw: Any) -> Any:
    cfg = dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, **kw)
    return tr.GPT2LMHeadModel(tr.GPT2Config(**cfg))


def _llama(**kw: Any) -> Any:
    cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    cfg |= dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tr.LlamaForCausalLM(tr.LlamaConfig(**{**cfg, "rope_theta": 500.0, **kw}))


# Llama 3.1's scaling with a short original context, so that its blended and divided bands occur
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
LLAMA3 |= {"original_max_position_embeddings": 16, "rope_theta": 500.0}


def _bert(**kw: Any) -> Any:
    cfg = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    cfg |= dict(intermediate_size=48, max_position_embeddings=64, **kw)
    return tr.BertForPreTraining(tr.BertConfig(**cfg))


def _marian(**kw: Any) -> Any:
    cfg = dict(vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=1)
    cfg |= dict(encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48)
    cfg |= dict(decoder_ffn_dim=48, max_position_embeddings=64, pad_token_id=96)
    cfg |= dict(decoder_start_token_id=96, activation_function="swish", scale_embedding=True)
    model = tr.MarianMTModel(tr.MarianConfig(**{**cfg, **kw}))
    with torch.no_grad():
        model.final_logits_bias.normal_()  # zeros by default: would hide a missing bias
    return model


def _batch(seed: int, b: int = 3, t: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 96, (b, t), generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    return tokens, torch.arange(t) < lengths[:, None]  # right padding


def _decoder_logits(model: Any, params: Any, x: torch.Tensor, valid: torch.Tensor) -> Any:
    return model.apply(params, x, valid=valid)[valid]


def _hf_decoder_logits(m: Any, x: torch.Tensor, valid: torch.Tensor) -> Any:
    return m(x, attention_mask=valid.long()).logits[valid]


def _bert_logits(model: Any, params: Any, x: torch.Tensor, valid: torch.Tensor) -> Any:
    out = model.apply(params, x, valid=valid)
    return model.mlm_logits(params, out.hidden)[valid], model.nsp_logits(params, out.pooled)


def _hf_bert_logits(m: Any, x: torch.Tensor, valid: torch.Tensor) -> Any:
    out = m(x, attention_mask=valid.long())
    return out.prediction_logits[valid], out.seq_relationship_logits


def _marian_logits(model: Any, params: Any, x: torch.Tensor, valid: torch.Tensor) -> Any:
    return model.apply(params, x, x[:, :5], src_valid=valid)


def _hf_marian_logits(m: Any, x: torch.Tensor, valid: torch.Tensor) -> Any:
    return m(input_ids=x, attention_mask=valid.long(), decoder_input_ids=x[:, :5]).logits


CASES = {
    "gpt2": (_gpt2, _decoder_logits, _hf_decoder_logits),
    "gpt2-untied": (lambda: _gpt2(tie_word_embeddings=False), _decoder_logits, _hf_decoder_logits),
    "llama-gqa": (_llama, _decoder_logits, _hf_decoder_logits),
    "llama-tied": (lambda: _llama(tie_word_embeddings=True), _decoder_logits, _hf_decoder_logits),
    "llama-rope-linear": (
        lambda: _llama(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0}),
        _decoder_logits,
        _hf_decoder_logits,
    ),
    "llama-head-dim": (lambda: _llama(head_dim=16), _decoder_logits, _hf_decoder_logits),
    "llama-rope-llama3": (
        lambda: _llama(rope_parameters=LLAMA3),
        _decoder_logits,
        _hf_decoder_logits,
    ),
    "bert": (_bert, _bert_logits, _hf_bert_logits),
    "marian": (_marian, _marian_logits, _hf_marian_logits),
    "marian-unscaled-gelu": (
        lambda: _marian(scale_embedding=False, activation_function="gelu"),
        _marian_logits,
        _hf_marian_logits,
    ),
}


def _close(a: Any, b: Any) -> None:
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=TOL, atol=TOL)


@pytest.fixture(scope="module", params=list(CASES))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    make, ours, theirs = CASES[request.param]
    torch.manual_seed(0)
    reference = make().eval()
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder)
    model, params = hf.load(folder)
    return reference, fl.nn.inference(model), params, ours, theirs


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), b=st.integers(1, 4), t=st.integers(5, 12))
def test_loaded_logits_equal_transformers(saved: Any, seed: int, b: int, t: int) -> None:
    reference, model, params, ours, theirs = saved
    x, valid = _batch(seed, b, t)
    with torch.no_grad():
        _close(ours(model, params, x, valid), theirs(reference, x, valid))


def test_saved_folder_loads_in_transformers_with_the_same_logits(
    saved: Any, tmp_path: Path
) -> None:
    reference, model, params, _, theirs = saved
    hf.save(model, params, tmp_path / "out")
    back = type(reference).from_pretrained(tmp_path / "out").eval()
    x, valid = _batch(1)
    with torch.no_grad():
        _close(theirs(back, x, valid), theirs(reference, x, valid))
    _, again = hf.load(tmp_path / "out")
    assert fl.tree.flatten(again).keys() == fl.tree.flatten(params).keys()
    for name, leaf in fl.tree.flatten(params).items():
        assert torch.equal(fl.tree.flatten(again)[name], leaf), name


def test_greedy_generation_of_a_loaded_gpt2_equals_transformers(tmp_path: Path) -> None:
    torch.manual_seed(1)
    reference = _gpt2().eval()
    reference.save_pretrained(tmp_path)
    model, params = hf.load(tmp_path)
    prompt = torch.randint(0, 96, (2, 4))
    with torch.no_grad():
        want = reference.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    got = fl.generate.generate(fl.nn.inference(model), params, prompt, max_new_tokens=12)
    assert torch.equal(got.tokens, want)


def test_a_sharded_folder_and_a_bare_base_model_load(tmp_path: Path) -> None:
    torch.manual_seed(2)
    reference = _llama().eval()
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model, params = hf.load(tmp_path / "sharded")
    x, valid = _batch(3)
    with torch.no_grad():
        _close(
            _decoder_logits(fl.nn.inference(model), params, x, valid),
            _hf_decoder_logits(reference, x, valid),
        )
    gpt2 = _gpt2().eval()
    gpt2.transformer.save_pretrained(tmp_path / "bare")  # GPT2Model: no "transformer." prefix
    _, bare = hf.load(tmp_path / "bare")
    assert torch.equal(bare["embed"]["table"], gpt2.transformer.wte.weight.detach())


def test_tf_era_bert_names_and_dtype_choice(tmp_path: Path) -> None:
    torch.manual_seed(3)
    reference = _bert().eval()
    reference.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma"): v for k, v in tensors.items()}
    save_file(renamed, file, metadata={"format": "pt"})
    _, params = hf.load(tmp_path, dtype=torch.float64)
    assert params["embed_norm"]["scale"].dtype == torch.float64
    weight = reference.bert.embeddings.LayerNorm.weight.detach().double()
    assert torch.equal(params["embed_norm"]["scale"], weight)


# -- bad input -------------------------------------------------------------------------------


def _edit(folder: Path, tensors: Any = None, **config: Any) -> None:
    if config:
        data = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**data, **config}))
    if tensors is not None:
        save_file(tensors(load_file(folder / "model.safetensors")), folder / "model.safetensors")


@pytest.fixture
def gpt2_folder(tmp_path: Path) -> Path:
    torch.manual_seed(4)
    _gpt2().save_pretrained(tmp_path)
    return tmp_path


def _drop(name: str) -> Any:
    return lambda t: {k: v for k, v in t.items() if k != name}


@pytest.mark.parametrize(
    ("config", "tensors", "message"),
    [
        ({"model_type": "t5"}, None, r"model_type 't5' is not supported \(supported: gpt2, llama"),
        ({"scale_attn_by_inverse_layer_idx": True}, None, "scale_attn_by_inverse_layer_idx=True"),
        ({"activation_function": "quick_gelu"}, None, "activation_function='quick_gelu'"),
        ({}, _drop("transformer.h.1.mlp.c_fc.bias"), r"lacks 1 tensor.*h\.1\.mlp\.c_fc\.bias"),
        ({}, lambda t: {**t, "transformer.extra.weight": torch.zeros(2)}, "extra.weight"),
        ({"n_inner": 64}, None, r"mlp\.c_fc\.weight has shape \(32, 128\) .* gives \(32, 64\)"),
        ({}, lambda t: {**t, "lm_head.weight": torch.zeros(97, 32)}, "lm_head.weight differs"),
    ],
)
def test_bad_folders_are_refused_by_name(
    gpt2_folder: Path, config: dict, tensors: Any, message: str
) -> None:
    _edit(gpt2_folder, tensors, **config)
    with pytest.raises(hf.MappingError, match=message):
        hf.load(gpt2_folder)


def test_unsupported_llama_fields_are_refused(tmp_path: Path) -> None:
    _llama().save_pretrained(tmp_path)
    scaling = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 500.0}
    _edit(tmp_path, rope_parameters=scaling)
    with pytest.raises(hf.MappingError, match="rope_type='yarn'"):
        hf.load(tmp_path)
    _edit(tmp_path, rope_parameters=None, head_dim=16)  # a head_dim the weights were not made for
    with pytest.raises(
        hf.MappingError, match=r"q_proj.weight has shape \(32, 32\) but the config gives \(64, 32\)"
    ):
        hf.load(tmp_path)


def test_a_pickle_only_folder_is_refused_without_reading_it(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read: would be unpickled")
    with pytest.raises(hf.MappingError, match=r"pytorch_model.bin, a pickle; .* never unpickles"):
        hf.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        hf.load(tmp_path / "absent")


def test_save_refuses_what_the_family_cannot_express(tmp_path: Path) -> None:
    cfg = fl.models.GPTConfig(vocab_size=50, max_seq_len=16, d_model=16, n_layers=1, n_heads=2)
    sinusoidal = fl.models.GPT(fl.models.GPTConfig(**{**cfg.__dict__, "positions": "sinusoidal"}))
    params = sinusoidal.init(fl.random.key(0))
    with pytest.raises(hf.MappingError, match=r"GPTConfig.positions='sinusoidal': GPT-2 needs"):
        hf.save(sinusoidal, params, tmp_path / "a")
    native = fl.models.Transformer(
        fl.models.TransformerConfig(src_vocab_size=30, tgt_vocab_size=30, d_model=16, nhead=2)
    )
    with pytest.raises(hf.MappingError, match=r"TransformerConfig.final_norm=True: Marian"):
        hf.save(native, native.init(fl.random.key(0)), tmp_path / "b")
    gpt = fl.models.GPT(cfg)
    wrong = gpt.init(fl.random.key(0))
    wrong["embed"]["table"] = torch.zeros(49, 16)
    with pytest.raises(hf.MappingError, match=r"embed.table has shape \(49, 16\) .* \(50, 16\)"):
        hf.save(gpt, wrong, tmp_path / "c")
    hf.save(gpt, gpt.init(fl.random.key(0)), tmp_path / "d")
    with pytest.raises(FileExistsError, match="not empty"):
        hf.save(gpt, gpt.init(fl.random.key(1)), tmp_path / "d")
    assert not list(tmp_path.glob("[abc]"))  # nothing written half-way


def test_marian_positions_must_stay_fixed(tmp_path: Path) -> None:
    torch.manual_seed(5)
    _marian().save_pretrained(tmp_path / "in")
    model, params = hf.load(tmp_path / "in")
    torch.testing.assert_close(params["src_pos"]["table"], hf.marian_positions(64, 32))
    params["tgt_pos"]["table"] = params["tgt_pos"]["table"] + 0.1
    with pytest.raises(hf.MappingError, match=r"tgt_pos.table is not Marian's fixed"):
        hf.save(model, params, tmp_path / "out")


def test_rope_scaling_round_trips_through_checkpoint_configs() -> None:
    scaling = fl.nn.RopeScaling(kind="llama3", factor=8.0, original_max_len=16)
    cfg = fl.models.GPTConfig.llama(vocab_size=50, d_model=16, n_heads=2, rope_scaling=scaling)
    data = fl.checkpoint.config_to_dict(cfg)
    assert json.loads(json.dumps(data))["rope_scaling"]["kind"] == "llama3"
    assert fl.checkpoint.config_from_dict(fl.models.GPTConfig, data) == cfg
    with pytest.raises(ValueError, match=r"RopeScaling.kind must be 'linear' or 'llama3'"):
        fl.nn.RopeScaling(kind="yarn", factor=2.0)


def test_marian_with_separate_source_and_target_vocabularies(tmp_path: Path) -> None:
    torch.manual_seed(6)
    reference = _marian(
        decoder_vocab_size=80, share_encoder_decoder_embeddings=False, pad_token_id=79,
        decoder_start_token_id=79,
    ).eval()  # fmt: skip
    reference.save_pretrained(tmp_path / "in")
    model, params = hf.load(tmp_path / "in")
    assert params["src_embed"]["table"].shape == (97, 32)
    assert params["tgt_embed"]["table"].shape == (80, 32)
    x, valid = _batch(7)
    y = x[:, :4] % 80
    with torch.no_grad():
        want = reference(input_ids=x, attention_mask=valid.long(), decoder_input_ids=y).logits
        got = fl.nn.inference(model).apply(params, x, y, src_valid=valid)
        torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
        hf.save(model, params, tmp_path / "out", pad_token_id=79, decoder_start_token_id=79)
        back = tr.MarianMTModel.from_pretrained(tmp_path / "out").eval()
        again = back(input_ids=x, attention_mask=valid.long(), decoder_input_ids=y).logits
        torch.testing.assert_close(again, want, rtol=TOL, atol=TOL)
