"""Attribution against captum (the field's reference) and against its own definitions:
integrated gradients and gradient x input on an MLP, completeness on a GPT's token
embeddings, attention rollout on weights a GPT returns."""

from __future__ import annotations

import pytest
import torch

import functional_llm as fl
from functional_llm import interpret, random

captum = pytest.importorskip("captum.attr")


def _mlp() -> tuple:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    ).double()
    return (lambda x: net(x).squeeze(-1)), torch.randn(4, 6, dtype=torch.float64)


def test_integrated_gradients_equal_captums() -> None:
    f, x = _mlp()
    ours = interpret.integrated_gradients(f, x, steps=20, method="gausslegendre")
    theirs = captum.IntegratedGradients(f).attribute(x, n_steps=20, method="gausslegendre")
    torch.testing.assert_close(ours.values, theirs, rtol=1e-6, atol=1e-8)
    assert float(ours.delta.abs().max()) < 1e-10  # complete, to Gauss-Legendre's accuracy
    # captum's trapezoid weighs its n nodes by 1/n (they sum to (n-1)/n); ours by 1/(n-1)
    ours = interpret.integrated_gradients(f, x, steps=20, method="riemann_trapezoid")
    theirs = captum.IntegratedGradients(f).attribute(x, n_steps=20, method="riemann_trapezoid")
    torch.testing.assert_close(ours.values, theirs * 20 / 19, rtol=1e-6, atol=1e-8)


def test_gradient_x_input_equals_captums() -> None:
    f, x = _mlp()
    theirs = captum.InputXGradient(f).attribute(x.clone().requires_grad_())
    torch.testing.assert_close(interpret.gradient_x_input(f, x).values, theirs.detach())


def test_token_attributions_of_a_gpt_are_complete() -> None:
    cfg = fl.models.GPTConfig(vocab_size=17, max_seq_len=8, d_model=16, n_layers=2, n_heads=2,
                              dtype=torch.float64)  # fmt: skip
    model = fl.models.GPT(cfg)
    params = model.init(random.key(0))
    tokens = random.randint(random.key(1), (2, 6), 0, 17)
    nxt = random.randint(random.key(2), (2,), 0, 17)

    def target(logits: torch.Tensor) -> torch.Tensor:  # log p(next token | the 6 tokens)
        return torch.log_softmax(logits[:, -1], -1).gather(-1, nxt[:, None]).squeeze(-1)

    ig = interpret.gpt_token_attributions(model, params, tokens, target, steps=32)
    assert ig.values.shape == (2, 6)
    assert float(ig.delta.abs().max()) < 1e-6
    gxi = interpret.gpt_token_attributions(model, params, tokens, target, method="gradient_x_input")
    assert gxi.values.shape == (2, 6) and bool(torch.isfinite(gxi.values).all())


def test_attention_rollout_follows_its_definition() -> None:
    cfg = fl.models.GPTConfig(vocab_size=17, max_seq_len=8, d_model=16, n_layers=2, n_heads=2)
    model = fl.models.GPT(cfg)
    params = model.init(random.key(0))
    tokens = random.randint(random.key(1), (1, 5), 0, 17)
    _, weights = model.hidden_states(params, tokens, return_weights=True)
    weights = [layer["attn"] for layer in weights]  # (B, heads, T, T) per layer
    rollout = interpret.attention_rollout(weights)
    eye = torch.eye(5)
    a = [(0.5 * eye + 0.5 * w.mean(1)) for w in weights]
    a = [m / m.sum(-1, keepdim=True) for m in a]
    torch.testing.assert_close(rollout, a[1] @ a[0])
    torch.testing.assert_close(rollout.sum(-1), torch.ones(1, 5))
    assert bool((rollout[0].triu(1) == 0).all())  # causal attention rolls out causally


def test_bad_attribution_requests_are_clear_errors() -> None:
    f, x = _mlp()
    with pytest.raises(ValueError, match="steps must be >= 2"):
        interpret.integrated_gradients(f, x, steps=1)
    with pytest.raises(ValueError, match="method must be 'riemann_trapezoid' or 'gausslegendre'"):
        interpret.integrated_gradients(f, x, method="simpson")
    with pytest.raises(ValueError, match="no layers"):
        interpret.attention_rollout([])


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_the_logit_lens_ends_at_the_models_logits(flavour: str) -> None:
    fields = dict(vocab_size=17, max_seq_len=8, d_model=16, n_layers=3, n_heads=2)
    cfg = (
        fl.models.GPTConfig.llama(**fields) if flavour == "llama" else fl.models.GPTConfig(**fields)
    )
    model = fl.models.GPT(cfg)
    params = model.init(random.key(0))
    tokens = random.randint(random.key(1), (2, 6), 0, 17)
    valid = torch.arange(6) < torch.tensor([[6], [4]])
    lens = interpret.logit_lens(model, params, tokens, valid)
    assert lens.shape == (4, 2, 6, 17)
    torch.testing.assert_close(
        lens[-1], model.apply(params, tokens, valid=valid), rtol=1e-5, atol=1e-5
    )
    first = model.logits(
        params, model.stack.finish(params, model.embed(params, tokens, torch.arange(6)))
    )
    torch.testing.assert_close(lens[0], first)  # layer 0: the embeddings read out directly
    with pytest.raises(ValueError, match="inference"):
        dropped = fl.models.GPT(fl.models.GPTConfig(**{**cfg.__dict__, "dropout": 0.1}))
        interpret.logit_lens(dropped, params, tokens)
