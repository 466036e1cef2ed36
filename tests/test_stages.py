"""Pipeline stages belong to the model: composed in order they are the model's forward, and
between them they hold every parameter once (a tied one in the first and the last stage)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functional_llm as fl
from functional_llm import models, random
from tests.models_zoo import bert, gpt2, llama, tokens

FAMILIES = {
    "gpt2": lambda: gpt2(n_layers=3),
    "gpt2_untied": lambda: gpt2(n_layers=3, tie_embeddings=False),
    "llama": lambda: llama(n_layers=3),
    "bert": lambda: bert(n_layers=3),
}


def forward(model, params, x):
    if isinstance(model, models.BERT):
        return model.mlm_logits(params, model.apply(params, x).hidden)
    return model.apply(params, x)


@given(name=st.sampled_from(sorted(FAMILIES)), n_stages=st.integers(1, 3), seed=st.integers(0, 99))
def test_stages_compose_to_the_forward(name, n_stages, seed):
    model = FAMILIES[name]()
    params = model.init(random.key(seed))
    x = tokens(seed, (2, 7))
    stages = model.stages(n_stages)
    h = x
    for stage in stages:
        h = stage.apply(stage.select(params), h)
    torch.testing.assert_close(h, forward(model, params, x), rtol=1e-6, atol=1e-6)

    held = [
        fl.tree.flatten({k: v for k, v in s.select(params).items() if k != "blocks"})
        for s in stages
    ]
    blocks = sum(len(s.select(params)["blocks"]) for s in stages)
    assert blocks == model.config.n_layers
    top = {p for h in held for p in h}
    unused = ("blocks.", "pooler.", "nsp.")  # BERT's stages are masked-LM: no NSP head
    assert top == {p for p in fl.tree.flatten(params) if not p.startswith(unused)}
    for path in top:  # once, unless shared (tied) by the first and the last stage
        holders = [i for i, h in enumerate(held) if path in h]
        tied = any(path.startswith(n + ".") for n in stages[0].shared)
        assert holders == ([0, n_stages - 1] if tied and n_stages > 1 else holders[:1])


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_stages_refuse_dropout(name):
    model = gpt2(dropout=0.1) if name == "gpt2" else bert(dropout=0.1)
    with pytest.raises(ValueError, match="without keys"):
        model.stages(2)
    assert len(fl.nn.inference(model).stages(2)) == 2


def test_more_stages_than_blocks_is_an_error():
    with pytest.raises(ValueError, match="n_stages"):
        gpt2(n_layers=2).stages(3)
