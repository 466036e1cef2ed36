"""The testing helpers: tree comparisons name the path; strategies give valid, runnable configs."""

import pytest
import torch
from hypothesis import given

import functional_llm as fl
from functional_llm import models, testing


def test_assert_trees_close_names_each_differing_path():
    a = {"blocks": [{"w": torch.zeros(2)}, {"w": torch.zeros(2)}], "b": torch.ones(1)}
    b = {"blocks": [{"w": torch.zeros(2)}, {"w": torch.tensor([0.0, 1.0])}], "b": torch.ones(1)}
    testing.assert_trees_close(a, a)
    with pytest.raises(AssertionError, match=r"1 of 3 leaves differ:\n  blocks\.1\.w: "):
        testing.assert_trees_close(a, b)
    with pytest.raises(AssertionError, match=r"missing \['b'\]"):
        testing.assert_trees_close({"blocks": a["blocks"]}, a)


def test_assert_trees_equal_is_bitwise():
    a = {"w": torch.tensor([1.0, 2.0])}
    testing.assert_trees_equal(a, {"w": torch.tensor([1.0, 2.0])})
    with pytest.raises(AssertionError, match="w: not bitwise equal"):
        testing.assert_trees_equal(a, {"w": torch.nextafter(a["w"], torch.tensor(3.0))})
    with pytest.raises(AssertionError, match="w: not bitwise equal"):
        testing.assert_trees_equal(a, {"w": a["w"].double()})


@given(cfg=testing.gpt_configs(), key=testing.keys())
def test_gpt_configs_build_models_that_are_causal(cfg, key):
    model = models.GPT(cfg)
    params = model.init(key)
    length = cfg.max_seq_len
    tokens = fl.random.randint(fl.random.fold_in(key, 1), (2, length), 0, cfg.vocab_size)
    testing.check_causal(lambda t: model.apply(params, t), tokens, cfg.vocab_size)
    assert model.apply(params, tokens).shape == (2, length, cfg.vocab_size)
