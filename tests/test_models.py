"""Model families: causality, padding, keys and dropout, sizes, configs and input errors."""

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functional_llm as fl
from functional_llm import models, nn, random, testing
from functional_llm.nn import taps
from tests.models_zoo import DECODERS, VOCAB, bert, gpt2, llama, tokens, transformer

TOL = dict(atol=1e-5, rtol=1e-5)
seeds = st.integers(0, 2**32 - 1)


@given(seed=seeds, flavour=st.sampled_from(sorted(DECODERS)), length=st.integers(2, 16))
def test_gpt_logits_before_t_ignore_tokens_from_t_on(seed, flavour, length):
    model = DECODERS[flavour]()
    params = model.init(random.key(seed))
    testing.check_causal(lambda t: model.apply(params, t), tokens(seed, (2, length)), VOCAB)


@given(seed=seeds, flavour=st.sampled_from(sorted(DECODERS)), data=st.data())
def test_gpt_left_padding_is_invisible(seed, flavour, data):
    model = DECODERS[flavour]()
    params = model.init(random.key(seed))
    n_pad = data.draw(st.integers(1, 4))
    x = tokens(seed, (1, 8))
    valid = torch.arange(8) >= n_pad
    edited = torch.where(valid, x, tokens(seed + 1, (1, 8)))
    positions = (torch.arange(8) - n_pad).clamp(min=0)  # real tokens start at position 0
    a = model.apply(params, x, valid=valid[None], positions=positions)
    b = model.apply(params, edited, valid=valid[None], positions=positions)
    torch.testing.assert_close(a[:, valid], b[:, valid], **TOL)
    if flavour == "llama":  # with rotary positions, left padding equals the unpadded sequence
        c = model.apply(params, x[:, n_pad:])
        torch.testing.assert_close(a[:, valid], c, **TOL)


@given(seed=seeds, data=st.data())
def test_bert_padding_is_invisible(seed, data):
    model = bert()
    params = model.init(random.key(seed))
    n_real = data.draw(st.integers(1, 7))
    valid = (torch.arange(8) < n_real).expand(2, 8)
    types = (torch.arange(8) >= n_real // 2).long().expand(2, 8)
    apply = lambda t, v: model.apply(params, t, types, valid=v)  # noqa: E731
    testing.check_padding_invariance(apply, tokens(seed, (2, 8)), valid, VOCAB)


@given(seed=seeds, data=st.data())
def test_transformer_source_padding_and_target_causality(seed, data):
    model = transformer()
    params = model.init(random.key(seed))
    src, tgt = tokens(seed, (2, 7)), tokens(seed + 1, (2, 6), VOCAB + 2)
    n_src, t = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 5))
    src_valid = (torch.arange(7) < n_src).expand(2, 7)
    src2 = torch.where(src_valid, src, tokens(seed + 2, (2, 7)))
    tgt2 = torch.cat([tgt[:, :t], tokens(seed + 3, (2, 6 - t), VOCAB + 2)], dim=1)
    a = model.apply(params, src, tgt, src_valid=src_valid)
    b = model.apply(params, src2, tgt2, src_valid=src_valid)
    torch.testing.assert_close(a[:, :t], b[:, :t], **TOL)
    assert a.shape == (2, 6, VOCAB + 2)


def test_gpt2_small_has_124_439_808_parameters():
    model = models.GPT(models.GPTConfig.gpt2("small"))
    assert fl.tree.size(model.shapes()) == 124_439_808
    assert fl.tree.size(fl.nn.eval_shape(model.init, random.key(0))) == 124_439_808


def test_bert_base_matches_the_published_layout():
    # BertForPreTraining: 109,482,240 in the encoder and pooler plus the MLM transform,
    # its LayerNorm, the MLM output bias and the NSP classifier.
    size = fl.tree.size(models.BERT(models.BERTConfig.base()).shapes())
    assert size == 109_482_240 + (768 * 768 + 768) + 2 * 768 + 30522 + (768 * 2 + 2)


FAMILIES = {"gpt2": gpt2, "llama": llama, "bert": bert, "transformer": transformer}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_same_key_same_params_different_keys_differ(name):
    model = FAMILIES[name]()
    a, b, c = model.init(random.key(7)), model.init(random.key(7)), model.init(random.key(8))
    for path, x in fl.tree.flatten(a).items():
        assert torch.equal(x, fl.tree.flatten(b)[path]), path
    random_leaves = [p for p, x in fl.tree.flatten(a).items() if x.unique().numel() > 1]
    assert random_leaves, "every param is a constant"
    for path in random_leaves:
        assert not torch.equal(fl.tree.flatten(a)[path], fl.tree.flatten(c)[path]), path


def _run(model, params, key):
    x = tokens(0, (2, 8))
    if isinstance(model, models.Transformer):
        return model.apply(params, x, tokens(1, (2, 5)), key=key)
    out = model.apply(params, x, key=key)
    return out.hidden if isinstance(out, models.BERTOutput) else out


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_dropout_masks_follow_the_key_and_evaluation_is_explicit(name):
    field = "dropout"
    with_dropout, without = FAMILIES[name](**{field: 0.3}), FAMILIES[name](**{field: 0.0})
    params = with_dropout.init(random.key(0))
    k = random.key(1)
    assert torch.equal(_run(with_dropout, params, k), _run(with_dropout, params, k))
    assert not torch.allclose(
        _run(with_dropout, params, k), _run(with_dropout, params, random.key(2))
    )
    with pytest.raises(ValueError, match="without a key"):  # a forgotten key is an error
        _run(with_dropout, params, None)
    evaluated = nn.inference(with_dropout)
    assert evaluated == without and with_dropout.config.dropout == 0.3  # a new value, pure
    torch.testing.assert_close(
        _run(evaluated, params, None), _run(without, params, None), atol=0, rtol=0
    )


def test_tied_and_untied_unembedding():
    tied, untied = gpt2(), gpt2(tie_embeddings=False)
    p = tied.init(random.key(0))
    h = tied.hidden_states(p, tokens(0, (1, 4)))
    torch.testing.assert_close(tied.apply(p, tokens(0, (1, 4))), h @ p["embed"]["table"].T)
    assert "unembed" not in p and "unembed" in untied.init(random.key(0))


def test_bert_heads_shapes_and_tying():
    model = bert()
    p = model.init(random.key(0))
    out = model.apply(p, tokens(0, (3, 5)))
    logits = model.mlm_logits(p, out.hidden)
    assert logits.shape == (3, 5, VOCAB) and model.nsp_logits(p, out.pooled).shape == (3, 2)
    p2 = fl.tree.map(lambda x: x, p)
    p2["embed"] = {"table": p["embed"]["table"] * 2}
    assert not torch.allclose(model.mlm_logits(p2, out.hidden), logits)  # the MLM decoder is tied


@pytest.mark.parametrize("backbone", ["bert", "gpt2"])
def test_task_heads(backbone):
    body = FAMILIES[backbone]()
    x = tokens(0, (2, 6))
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    for head, shape in [
        (models.SequenceClassifier(body, num_labels=3), (2, 3)),
        (models.TokenClassifier(body, num_labels=5), (2, 6, 5)),
    ]:
        p = head.init(random.key(0))
        assert head.apply(p, x, valid=valid).shape == shape
    qa = models.ExtractiveQA(body)
    p = qa.init(random.key(0))
    spans = qa.apply(p, x, valid=valid)
    assert spans.start.shape == spans.end.shape == (2, 6)
    assert torch.isinf(spans.start[1, 4:]).all() and torch.isfinite(spans.start[1, :4]).all()


def test_gpt_classifier_pools_the_last_real_token():
    body = gpt2()
    head = models.SequenceClassifier(body, num_labels=3)
    p = head.init(random.key(0))
    x = tokens(0, (1, 6))
    valid = torch.tensor([[True] * 4 + [False] * 2])
    torch.testing.assert_close(head.apply(p, x, valid=valid), head.apply(p, x[:, :4]), **TOL)


def test_mean_pooling_is_the_mean_of_the_real_tokens_states():
    """Padding changes nothing (BERT: padded keys are masked), and the logits are the head on
    the mean of the hidden states, written out."""
    body = FAMILIES["bert"]()
    head = models.SequenceClassifier(body, num_labels=3, pooling="mean")
    p = head.init(random.key(0))
    x = tokens(0, (1, 6))
    valid = torch.tensor([[True] * 4 + [False] * 2])
    torch.testing.assert_close(head.apply(p, x, valid=valid), head.apply(p, x[:, :4]), **TOL)
    h = body.hidden_states(p["backbone"], x[:, :4])
    expected = h.mean(dim=1) @ p["head"]["w"] + p["head"]["b"]
    torch.testing.assert_close(head.apply(p, x[:, :4]), expected, **TOL)
    with pytest.raises(ValueError, match="pooling"):
        models.SequenceClassifier(body, num_labels=3, pooling="max")


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: models.GPTConfig(vocab_size=0), "GPTConfig.vocab_size"),
        (lambda: models.GPTConfig(d_model=100, n_heads=12), "GPTConfig.n_heads"),
        (lambda: models.GPTConfig(n_kv_heads=5), "GPTConfig.n_kv_heads"),
        (lambda: models.GPTConfig(positions="alibi"), "GPTConfig.positions"),
        (lambda: models.GPTConfig(dropout=1.0), "GPTConfig.dropout"),
        (lambda: models.GPTConfig.gpt2("huge"), "GPT-2 size"),
        (lambda: models.BERTConfig(n_layers=-1), "BERTConfig.n_layers"),
        (lambda: models.BERTConfig(activation="swish"), "BERTConfig.activation"),
        (
            lambda: models.TransformerConfig(
                src_vocab_size=10, tgt_vocab_size=10, d_model=30, nhead=4
            ),
            "TransformerConfig.nhead",
        ),
        (
            lambda: models.TransformerConfig(
                src_vocab_size=10, tgt_vocab_size=10, positions="rope"
            ),
            "TransformerConfig.positions",
        ),
        (
            lambda: models.TransformerConfig(src_vocab_size=10, tgt_vocab_size=10, embed_std=0.0),
            "TransformerConfig.embed_std",
        ),
        (
            lambda: models.TransformerConfig(
                src_vocab_size=10, tgt_vocab_size=12, share_embeddings=True
            ),
            "TransformerConfig.share_embeddings",
        ),
    ],
)
def test_bad_configs_name_the_field(make, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make()


def test_transformer_embeddings_start_at_the_configured_scale():
    """``embed_std`` sets both embeddings' N(0, std^2) init (1: torch.nn.Embedding's); the
    other parameters do not depend on it."""

    def make(std: float) -> models.Transformer:
        config = models.TransformerConfig(
            src_vocab_size=512, tgt_vocab_size=512, d_model=64, nhead=4, embed_std=std
        )
        return models.Transformer(config)

    wide, narrow = make(1.0).init(random.key(0)), make(0.125).init(random.key(0))
    for side in ("src_embed", "tgt_embed"):
        assert float(wide[side]["table"].std()) == pytest.approx(1.0, rel=0.03)
        torch.testing.assert_close(narrow[side]["table"], wide[side]["table"] * 0.125)
    torch.testing.assert_close(narrow["encoder"], wide["encoder"])


@given(tie=st.booleans(), seed=st.integers(0, 99))
def test_shared_embeddings_are_one_table_read_by_both_sides(tie, seed):
    """With ``share_embeddings`` the model is the unshared one whose source table is the target
    table: the same logits, and the shared table's gradient is the sum of the two tables'."""
    shared = transformer(tgt_vocab_size=VOCAB, share_embeddings=True, tie_output=tie)
    separate = transformer(tgt_vocab_size=VOCAB, tie_output=tie)
    p = shared.init(random.key(seed))
    assert "src_embed" not in p and set(p) == set(separate.init(random.key(0))) - {"src_embed"}
    src, tgt = tokens(seed, (2, 6)), tokens(seed + 1, (2, 5))

    def loss(model, params):
        return model.apply(params, src, tgt).square().mean()

    copied = {**p, "src_embed": p["tgt_embed"]}
    torch.testing.assert_close(shared.apply(p, src, tgt), separate.apply(copied, src, tgt))
    g_shared = torch.func.grad(lambda q: loss(shared, q))(p)
    g_separate = torch.func.grad(lambda q: loss(separate, q))(copied)
    both = g_separate["src_embed"]["table"] + g_separate["tgt_embed"]["table"]
    torch.testing.assert_close(g_shared["tgt_embed"]["table"], both)
    torch.testing.assert_close(g_shared["decoder"], g_separate["decoder"])


def test_configs_are_frozen_and_hashable():
    cfg = models.GPTConfig()
    assert hash(cfg) == hash(models.GPTConfig()) and cfg == models.GPTConfig()
    with pytest.raises(AttributeError):
        cfg.d_model = 1


def test_bad_inputs_name_the_argument_and_shapes():
    model = gpt2()
    p = model.init(random.key(0))
    with pytest.raises(
        TypeError, match=r"tokens must hold integer token ids, got dtype torch\.float32"
    ):
        model.apply(p, torch.zeros(1, 4))
    with pytest.raises(
        ValueError, match=r"tokens has length 17 \(shape \(1, 17\)\) > max_seq_len 16"
    ):
        model.apply(p, torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"valid has shape \(1, 3\) but tokens has shape \(1, 4\)"):
        model.apply(
            p, torch.zeros(1, 4, dtype=torch.long), valid=torch.ones(1, 3, dtype=torch.bool)
        )
    p["blocks"][1]["attn"]["q"]["w"] = torch.zeros(16, 2, 4)
    with pytest.raises(
        ValueError,
        match=r"params\.blocks\.1\.attn\.q\.w: expected shape \(16, 2, 8\), got \(16, 2, 4\)",
    ):
        model.apply(p, torch.zeros(1, 4, dtype=torch.long))


def test_gpt_attention_weights_are_captured_for_inspection():
    model = llama()
    params = model.init(random.key(0))
    x = tokens(0, (2, 7))
    h, acts = taps.capture(model.hidden_states, params, x, only="blocks.*.attn.weights")
    torch.testing.assert_close(h, model.hidden_states(params, x), **TOL)
    assert len(acts) == model.config.n_layers
    for w in acts.values():
        assert w.shape == (2, model.config.n_heads, 7, 7)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, model.config.n_heads, 7), **TOL)
        assert (w.triu(1) == 0).all()  # causal: no weight on future tokens


def _rates(value, path="model"):
    """Every dropout rate in a value and the layers and configs it holds, by path."""
    out = {}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if "dropout" in f.name or (isinstance(value, nn.Dropout) and f.name == "rate"):
                out[f"{path}.{f.name}"] = v
            out.update(_rates(v, f"{path}.{f.name}"))
    return out


def test_inference_zeroes_every_dropout_rate_in_heads_backbones_and_layers():
    bert_with_dropout = bert(dropout=0.2)
    values = [
        models.SequenceClassifier(bert_with_dropout, num_labels=3, dropout=0.4),
        models.ExtractiveQA(gpt2(dropout=0.1), dropout=0.3),
        nn.Stack(block=nn.Block(d_model=8, n_heads=2, d_ff=16, dropout=0.5), n_layers=2),
        nn.Dropout(rate=0.5),
    ]
    for value in values:
        before = _rates(value)
        assert any(before.values())
        evaluated = nn.inference(value)
        assert set(_rates(evaluated)) == set(before)
        assert not any(_rates(evaluated).values())
        assert _rates(value) == before  # the original is untouched
        assert nn.inference(evaluated) is evaluated  # nothing left to change
