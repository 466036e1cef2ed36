"""Intermediates through the layers' taps: the hidden states and attention maps of every family
against Hugging Face ``transformers`` (``output_hidden_states``/``output_attentions``, random-init
models saved to a temp folder); patching a site with its own value changes nothing; an
ablation equals the same weight surgery; errors name the site."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functional_llm as fl
from functional_llm import interpret, random
from functional_llm.nn import taps

tr = pytest.importorskip("transformers")
tr.logging.set_verbosity_error()
TOL = {"rtol": 1e-4, "atol": 1e-4}


def _hf_gpt2() -> Any:
    cfg = tr.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=3, n_head=4)
    cfg._attn_implementation = "eager"  # returns its attention probabilities
    return tr.GPT2LMHeadModel(cfg).eval()


def _hf_bert() -> Any:
    cfg = tr.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64)  # fmt: skip
    cfg._attn_implementation = "eager"
    return tr.BertForPreTraining(cfg).eval()


def _loaded(hf_model: Any, tmp_path: Path) -> tuple[Any, Any]:
    hf_model.save_pretrained(tmp_path)
    model, params = fl.interop.hf.load(tmp_path)
    return fl.nn.inference(model), params


def _batch(t: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = random.randint(random.key(1), (2, t), 0, 97)
    return tokens, torch.arange(t) < torch.tensor([[t], [t - 3]])


def _rows(weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The attention rows ``(n, heads, S)`` of real (unpadded) queries."""
    return weights.transpose(1, 2)[valid]


def _against(hf_model: Any, tmp_path: Path) -> tuple[tuple, Any, list[torch.Tensor]]:
    """Our loaded copy of ``hf_model``, its padded batch, transformers' outputs with hidden
    states and attentions, and our hidden states; our attention maps are checked here."""
    model, params = _loaded(hf_model, tmp_path)
    tokens, valid = _batch()
    with torch.no_grad():
        want = hf_model(tokens, attention_mask=valid.long(), output_hidden_states=True,
                        output_attentions=True)  # fmt: skip
    weights = interpret.attention_weights(model, params, tokens, valid=valid)
    assert len(weights) == len(want.attentions)
    for ours, theirs in zip(weights, want.attentions, strict=True):
        torch.testing.assert_close(_rows(ours, valid), _rows(theirs, valid), **TOL)
    states = interpret.hidden_states(model, params, tokens, valid=valid)
    assert len(states) == len(want.hidden_states)
    return (model, params, tokens, valid), want, states


def test_gpt2_hidden_states_and_attention_equal_transformers(tmp_path: Path) -> None:
    (model, params, tokens, valid), want, states = _against(_hf_gpt2(), tmp_path)
    for ours, theirs in zip(states[:-1], want.hidden_states[:-1], strict=True):
        torch.testing.assert_close(ours[valid], theirs[valid], **TOL)
    # GPT-2's last hidden state is after its final LayerNorm (ln_f): our norm.output site
    _, acts = taps.capture(model.apply, params, tokens, valid=valid, only="norm.output")
    torch.testing.assert_close(acts["norm.output"][valid], want.hidden_states[-1][valid], **TOL)


def test_bert_hidden_states_and_attention_equal_transformers(tmp_path: Path) -> None:
    (model, params, tokens, valid), want, states = _against(_hf_bert(), tmp_path)
    for ours, theirs in zip(states, want.hidden_states, strict=True):
        torch.testing.assert_close(ours[valid], theirs[valid], **TOL)
    lens = interpret.logit_lens(model, params, tokens, valid=valid)
    torch.testing.assert_close(lens[-1][valid], want.prediction_logits[valid], **TOL)


def _models() -> dict[str, tuple[Any, Any, tuple, dict]]:
    """One small model of each family, float64, with its inputs (padded)."""
    f64 = {"dtype": torch.float64}
    tokens, valid = _batch(6)
    small = {"vocab_size": 97, "max_seq_len": 8, "d_model": 16, "n_layers": 2, **f64}
    gpt = fl.models.GPT(fl.models.GPTConfig.llama(n_heads=4, n_kv_heads=2, **small))
    bert = fl.nn.inference(fl.models.BERT(fl.models.BERTConfig(n_heads=2, d_ff=32, **small)))
    seq2seq = fl.nn.inference(fl.models.Transformer(fl.models.TransformerConfig(
        src_vocab_size=97, tgt_vocab_size=89, d_model=16, nhead=2, num_encoder_layers=2,
        num_decoder_layers=2, dim_feedforward=32, max_seq_len=8, **f64)))  # fmt: skip
    classifier = fl.models.SequenceClassifier(gpt, num_labels=3)
    tgt = tokens[:, :5] % 89
    return {
        "gpt": (gpt, gpt.init(random.key(0)), (tokens,), {"valid": valid}),
        "bert": (bert, bert.init(random.key(0)), (tokens,), {"valid": valid}),
        "seq2seq": (
            seq2seq,
            seq2seq.init(random.key(0)),
            (tokens, tgt),
            {"src_valid": valid, "tgt_valid": valid[:, :5]},
        ),
        "classifier": (classifier, classifier.init(random.key(0)), (tokens,), {"valid": valid}),
    }


MODELS = _models()


@settings(max_examples=20, deadline=None)
@given(family=st.sampled_from(sorted(MODELS)), data=st.data())
def test_patching_a_site_with_its_own_value_changes_nothing(family: str, data: Any) -> None:
    model, params, inputs, kw = MODELS[family]
    out, acts = taps.capture(model.apply, params, *inputs, **kw)
    site = data.draw(st.sampled_from(sorted(acts)))  # every site of the family
    # watching one site picks one attention kernel per layer (SDPA, or the explicit softmax
    # where weights are watched): compare runs that watch the same site, bit for bit
    seen, own = taps.capture(model.apply, params, *inputs, only=site, **kw)
    again = interpret.patch(model, params, {site: own[site]}, *inputs, **kw)
    plain = model.apply(params, *inputs, **kw)
    for a, b, c in zip(*map(fl.tree.leaves, (again, seen, plain)), strict=True):
        assert torch.equal(a, b), site
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    changed = interpret.patch(model, params, {site: lambda v: v + 1.0}, *inputs, **kw)
    if not site.endswith("weights"):  # a shifted softmax row can still be hidden by padding
        assert any(
            not torch.equal(a, b)
            for a, b in zip(fl.tree.leaves(out), fl.tree.leaves(changed), strict=True)
        )


def test_every_family_ends_its_logit_lens_at_its_logits() -> None:
    for family in ("gpt", "bert", "seq2seq"):
        model, params, inputs, kw = MODELS[family]
        lens = interpret.logit_lens(model, params, *inputs, **kw)
        out = model.apply(params, *inputs, **kw)
        logits = model.mlm_logits(params, out.hidden) if family == "bert" else out
        assert lens.shape == (3, *logits.shape)
        torch.testing.assert_close(lens[-1], logits)
        states = interpret.hidden_states(model, params, *inputs, **kw)
        torch.testing.assert_close(lens[0], interpret.readout(model, params, states[0]))


def test_cross_attention_and_the_encoders_states_are_reachable() -> None:
    model, params, (src, tgt), kw = MODELS["seq2seq"]
    cross = interpret.attention_weights(model, params, src, tgt, kind="cross", **kw)
    assert [w.shape for w in cross] == [(2, 2, 5, 6)] * 2
    assert bool((cross[0][1, ..., 3:] == 0).all())  # padded source positions get no weight
    encoder = interpret.hidden_states(model, params, src, tgt, stack="encoder", **kw)
    with pytest.raises(ValueError, match="only the decoder's states read out"):
        interpret.logit_lens(model, params, src, tgt, stack="encoder", **kw)
    memory = model.encode(params, src, src_valid=kw["src_valid"])
    torch.testing.assert_close(model.core.encoder.finish(params["encoder"], encoder[-1]), memory)


def test_ablating_heads_equals_zeroing_their_output_projection() -> None:
    model, params, inputs, kw = MODELS["gpt"]
    ablated = interpret.patch(
        model, params, {"blocks.1.attn.heads": torch.zeros_like}, *inputs, **kw
    )
    surgery = fl.tree.map(lambda x: x, params)
    surgery["blocks"][1]["attn"]["o"] = {**params["blocks"][1]["attn"]["o"]}
    surgery["blocks"][1]["attn"]["o"]["w"] = torch.zeros_like(params["blocks"][1]["attn"]["o"]["w"])
    torch.testing.assert_close(ablated, model.apply(surgery, *inputs, **kw))


def test_patches_hold_in_the_backward_pass_of_a_rematerialised_stack() -> None:
    model, params, (tokens,), kw = MODELS["gpt"]
    remat = fl.models.GPT(fl.models.GPTConfig(**{**model.config.__dict__, "remat": True}))
    zero = random.normal(random.key(5), (2, 6, 16), dtype=torch.float64)

    def grad(m: Any) -> torch.Tensor:
        p = fl.tree.map(lambda x: x.detach().requires_grad_(), params)
        with torch.enable_grad():
            out = interpret.patch(m, p, {"blocks.0.output": zero}, tokens, **kw)
            return torch.autograd.grad(out.square().sum(), p["blocks"][1]["mlp"]["up"]["w"])[0]

    torch.testing.assert_close(grad(remat), grad(model))


def test_capture_inside_vmap_gives_each_members_states() -> None:
    model, params, (tokens,), _ = MODELS["gpt"]
    members = fl.tree.map(lambda *xs: torch.stack(xs), params, model.init(random.key(9)))
    per = torch.func.vmap(lambda p: interpret.hidden_states(model, p, tokens)[-1])(members)
    torch.testing.assert_close(per[0], interpret.hidden_states(model, params, tokens)[-1])


def test_taps_leave_the_compiled_forward_whole() -> None:
    model, params, (tokens,), kw = MODELS["gpt"]
    compiled = torch.compile(model.apply, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(params, tokens, **kw), model.apply(params, tokens, **kw))


def test_bad_requests_name_the_site() -> None:
    model, params, inputs, kw = MODELS["gpt"]
    with pytest.raises(
        taps.PatchError, match=r"blocks\.0\.output.*shape \(2, 6, 16\).*\(2, 6, 8\)"
    ):
        interpret.patch(model, params, {"blocks.0.output": torch.zeros(2, 6, 8)}, *inputs, **kw)
    with pytest.raises(taps.PatchError, match=r"float64, the patch torch.float32"):
        interpret.patch(model, params, {"blocks.0.output": torch.zeros(2, 6, 16)}, *inputs, **kw)
    with pytest.raises(taps.PatchError, match=r"\['blocks\.7\.output'\].*blocks\.0\.attn\.heads"):
        interpret.patch(model, params, {"blocks.7.output": torch.zeros(1)}, *inputs, **kw)
    with pytest.raises(taps.PatchError, match="matches none"):
        taps.capture(model.apply, params, *inputs, only="blocks.*.cross.weights", **kw)
    with pytest.raises(taps.PatchError, match="no tap saw the params"):
        taps.capture(lambda p, *a, **k: model.apply(fl.tree.map(torch.clone, p), *a, **k),
                     params, *inputs, **kw)  # fmt: skip
    with pytest.raises(RuntimeError, match="already open"):
        taps.capture(lambda p: taps.capture(model.apply, p, *inputs), params)
    with pytest.raises(IndexError, match=r"layer 2 is out of range: the stack has 2 blocks"):
        interpret.check_layer(params, 2)
    with pytest.raises(ValueError, match="several stacks"):
        interpret.stack_path({"left": {"blocks": []}, "right": {"blocks": []}})
    assert interpret.stack_path(MODELS["classifier"][1]) == "backbone"
    copying = fl.models.Transformer(fl.models.TransformerConfig(
        src_vocab_size=9, tgt_vocab_size=9, d_model=8, nhead=2, num_encoder_layers=1,
        num_decoder_layers=1, dim_feedforward=16, copy_source=True))  # fmt: skip
    with pytest.raises(ValueError, match="copies from the source through its copy head"):
        interpret.readout(copying, copying.init(fl.random.key(0)), torch.zeros(1, 8))
