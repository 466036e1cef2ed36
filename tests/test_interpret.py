"""Attribution against captum (the field's reference) and against its own definitions:
integrated gradients and gradient x input on an MLP, completeness on every family's token
embeddings, attention rollout on a GPT's captured weights; the logit and tuned lenses."""

from __future__ import annotations

import dataclasses

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


@pytest.mark.parametrize("family", ["gpt", "bert-classifier", "seq2seq"])
def test_token_attributions_are_complete_for_every_family(family: str) -> None:
    f64 = {"dtype": torch.float64}
    tokens = random.randint(random.key(1), (2, 6), 0, 17)
    if family == "gpt":
        model = fl.models.GPT(fl.models.GPTConfig(vocab_size=17, max_seq_len=8, d_model=16,
                                                  n_layers=2, n_heads=2, **f64))  # fmt: skip
        inputs, embedding = (tokens,), "embed"
        nxt = random.randint(random.key(2), (2,), 0, 17)
        target = interpret.log_prob(nxt)  # log p(next token | the 6 tokens)
    elif family == "bert-classifier":
        small = {"vocab_size": 17, "max_seq_len": 8, "d_model": 16, "n_layers": 2, "d_ff": 32}
        bert = fl.models.BERT(fl.models.BERTConfig(n_heads=2, **small, **f64))
        model = fl.nn.inference(fl.models.SequenceClassifier(bert, num_labels=3))
        inputs, embedding, target = (tokens,), "embed", interpret.log_prob(2, position=None)
    else:
        model = fl.nn.inference(fl.models.Transformer(fl.models.TransformerConfig(
            src_vocab_size=17, tgt_vocab_size=13, d_model=16, nhead=2, num_encoder_layers=1,
            num_decoder_layers=1, dim_feedforward=32, max_seq_len=8, activation="gelu",
            **f64)))  # fmt: skip
        inputs, embedding = (tokens, tokens[:, :4] % 13), "src_embed"
        target = interpret.log_prob(5)  # which source words made the 5th target word
    params = model.init(random.key(0))
    ig = interpret.token_attributions(model, params, *inputs, target=target, embedding=embedding,
                                      steps=32)  # fmt: skip
    assert ig.values.shape == (2, 6)
    assert float(ig.delta.abs().max()) < 1e-6  # sum of attributions = f(x) - f(zero embedding)
    gxi = interpret.token_attributions(model, params, *inputs, target=target,
                                       embedding=embedding, method="gradient_x_input")  # fmt: skip
    assert gxi.values.shape == (2, 6) and bool(torch.isfinite(gxi.values).all())


def test_gpt_token_attributions_match_integrated_gradients_by_hand() -> None:
    """Against the definition: IG over the token part of the embedding, positions fixed."""
    cfg = fl.models.GPTConfig(vocab_size=17, max_seq_len=8, d_model=16, n_layers=2, n_heads=2)
    model = fl.models.GPT(dataclasses.replace(cfg, dtype=torch.float64))
    params = model.init(random.key(0))
    tokens = random.randint(random.key(1), (2, 6), 0, 17)
    target = interpret.log_prob(4)
    positions = torch.arange(6)
    token_part = params["embed"]["table"][tokens]
    rest = model.embed(params, tokens, positions) - token_part

    def f(e: torch.Tensor) -> torch.Tensor:
        h = model.stack.apply(params, e + rest, causal=True, positions=positions)
        return target(model.logits(params, h))

    want = interpret.integrated_gradients(f, token_part, steps=16).values.sum(-1)
    got = interpret.token_attributions(model, params, tokens, target=target, steps=16).values
    torch.testing.assert_close(got, want)


def test_attention_rollout_follows_its_definition() -> None:
    cfg = fl.models.GPTConfig(vocab_size=17, max_seq_len=8, d_model=16, n_layers=2, n_heads=2)
    model = fl.models.GPT(cfg)
    params = model.init(random.key(0))
    tokens = random.randint(random.key(1), (1, 5), 0, 17)
    weights = interpret.attention_weights(model, params, tokens)  # (B, heads, T, T) per layer
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
    gpt = fl.models.GPT(fl.models.GPTConfig(vocab_size=17, max_seq_len=8, d_model=8, n_layers=1,
                                            n_heads=2))  # fmt: skip
    params, tokens = gpt.init(random.key(0)), torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"target \[17\] is outside the 17 scores \(0\.\.16\)"):
        interpret.token_attributions(gpt, params, tokens, target=interpret.log_prob(17))
    with pytest.raises(ValueError, match=r"no single embedding 'word' in the params; .*'embed'"):
        interpret.token_attributions(gpt, params, tokens, target=interpret.log_prob(1),
                                     embedding="word")  # fmt: skip


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
    lens = interpret.logit_lens(model, params, tokens, valid=valid)
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


def test_a_fitted_tuned_lens_reads_layers_better_than_the_logit_lens() -> None:
    """On held-out batches of a trained model, the fitted translators' KL to the final layer is
    below the logit lens's (their starting point), and the last layer stays the logits."""
    cfg = fl.models.GPTConfig(vocab_size=13, max_seq_len=12, d_model=16, n_layers=3, n_heads=2)
    model = fl.models.GPT(cfg)
    data = torch.arange(400) * 7 % 13  # a cyclic sequence the model learns
    windows = lambda at: torch.stack([data[i : i + 12] for i in at])  # noqa: E731
    params = model.init(random.key(0))
    step = fl.train.make_step(fl.losses.next_token(model), fl.optim.adam(3e-3))
    state = fl.train.init_state(params, fl.optim.adam(3e-3), random.key(1))
    for s in range(60):
        state, _ = step(state, {"tokens": windows(range(s % 20, 380, 40))})
    params = state.params
    batches = [((windows(range(s % 30, 300, 29)),), {}) for s in range(150)]
    lens, _ = interpret.fit_tuned_lens(model, params, batches,
                                            optimizer=fl.optim.adam(1e-2))  # fmt: skip
    held = windows(range(305, 380, 3))
    start = interpret.init_tuned_lens(model, params)
    states = interpret.hidden_states(model, params, held)
    weight = torch.ones(held.shape)
    before = float(interpret.lens.lens_loss(model, params, start, states, weight))
    after = float(interpret.lens.lens_loss(model, params, lens, states, weight))
    assert after < 0.7 * before, (before, after)
    tuned = interpret.tuned_lens(model, params, lens, held)
    torch.testing.assert_close(tuned[-1], model.apply(params, held))
    torch.testing.assert_close(interpret.tuned_lens(model, params, start, held),
                               interpret.logit_lens(model, params, held))  # fmt: skip
    with pytest.raises(ValueError, match=r"do not fit a model of 3 layers and width 16"):
        interpret.tuned_lens(model, params, {"weight": torch.zeros(2, 16, 16),
                                             "bias": torch.zeros(2, 16)}, held)  # fmt: skip
