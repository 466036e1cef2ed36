"""Pipeline stages belong to the model: composed in order they are the model's forward, and
between them they hold every parameter once (a tied one in the first and the last stage)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functional_llm as fl
from functional_llm import models, random
from tests.models_zoo import VOCAB, bert, gpt2, llama, tokens, transformer

FAMILIES = {
    "gpt2": lambda: gpt2(n_layers=3),
    "gpt2_untied": lambda: gpt2(n_layers=3, tie_embeddings=False),
    "llama": lambda: llama(n_layers=3),
    "bert": lambda: bert(n_layers=3),
    "transformer": lambda: transformer(num_encoder_layers=1, num_decoder_layers=2),
    "transformer_tied": lambda: transformer(
        num_encoder_layers=2, num_decoder_layers=1, tie_output=True, tgt_vocab_size=VOCAB
    ),
    "transformer_shared": lambda: transformer(
        num_encoder_layers=1, num_decoder_layers=2, tgt_vocab_size=VOCAB, share_embeddings=True
    ),
}


def inputs(model, seed):
    if isinstance(model, models.Transformer):
        return tokens(seed, (2, 6)), tokens(seed + 1, (2, 5))
    return (tokens(seed, (2, 7)),)


def forward(model, params, xs):
    if isinstance(model, models.BERT):
        return model.mlm_logits(params, model.apply(params, *xs).hidden)
    return model.apply(params, *xs)


@given(name=st.sampled_from(sorted(FAMILIES)), n_stages=st.integers(1, 3), seed=st.integers(0, 99))
def test_stages_compose_to_the_forward(name, n_stages, seed):
    model = FAMILIES[name]()
    params = model.init(random.key(seed))
    xs = inputs(model, seed)
    stages = model.stages(n_stages)
    h = xs
    for stage in stages:
        h = stage.apply(stage.select(params), *h)
        h = h if isinstance(h, tuple) else (h,)
    torch.testing.assert_close(h[0], forward(model, params, xs), rtol=1e-6, atol=1e-6)

    # Between them the stages hold every param the forward reads: each block once, the rest
    # once too, unless shared (tied) by the first and the last stage.
    held = [{s.full_path(p) for p in fl.tree.flatten(s.select(params))} for s in stages]
    unused = ("pooler.", "nsp.")  # BERT's stages are masked-LM: no NSP head
    assert set().union(*held) == {p for p in fl.tree.flatten(params) if not p.startswith(unused)}
    for path in set().union(*held):
        holders = [i for i, h in enumerate(held) if path in h]
        tied = any(path.startswith(n + ".") for n in stages[0].shared)
        assert holders == ([0, n_stages - 1] if tied and n_stages > 1 else holders[:1]), path


@pytest.mark.parametrize("make", [gpt2, bert, transformer])
def test_stages_refuse_dropout(make):
    model = make(dropout=0.1)
    with pytest.raises(ValueError, match="without keys"):
        model.stages(2)
    assert len(fl.nn.inference(model).stages(2)) == 2


def test_more_stages_than_blocks_is_an_error():
    with pytest.raises(ValueError, match="n_stages"):
        gpt2(n_layers=2).stages(3)
