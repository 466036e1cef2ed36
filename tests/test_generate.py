"""Sampling: a pure function of the key; greedy and top-k behave as defined."""

import pytest
import torch

import functional_llm as fl
from functional_llm import random
from functional_llm.generate import sample


@pytest.fixture(scope="module")
def gpt():
    cfg = fl.models.GPTConfig(vocab_size=13, max_seq_len=6, d_model=16, n_layers=1, n_heads=2)
    model = fl.models.GPT(cfg)
    return model, model.init(random.key(0))


def test_same_key_same_text_and_prompt_kept(gpt):
    model, params = gpt
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    a = sample(model, params, prompt, 9, random.key(1))  # longer than max_seq_len: window slides
    b = sample(model, params, prompt, 9, random.key(1))
    c = sample(model, params, prompt, 9, random.key(2))
    assert a.shape == (2, 12) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :3], prompt)


def test_greedy_and_top1_pick_the_argmax_of_the_last_window(gpt):
    model, params = gpt
    prompt = torch.tensor([[1, 2, 3]])
    greedy = sample(model, params, prompt, 5, random.key(0), temperature=0)
    top1 = sample(model, params, prompt, 5, random.key(7), top_k=1)
    assert torch.equal(greedy, top1)
    for t in range(3, 8):
        window = greedy[:, max(0, t - 6) : t]
        assert int(model.apply(params, window)[0, -1].argmax()) == int(greedy[0, t])


def test_top_k_only_draws_from_the_k_most_likely(gpt):
    model, params = gpt
    prompt = torch.tensor([[3]]).expand(200, 1)
    drawn = sample(model, params, prompt, 1, random.key(3), top_k=3)[:, 1]
    allowed = model.apply(params, prompt[:1])[0, -1].topk(3).indices
    assert set(drawn.tolist()) <= set(allowed.tolist())
    with pytest.raises(ValueError, match="prompt must be"):
        sample(model, params, torch.tensor([1, 2]), 1, random.key(0))
