"""The property-testing kit (``functional_llm.testing``) on every family: each check passes on
the library's models and optimizers, and fails, saying why, on a function that breaks its
property (a check that cannot fail proves nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functional_llm as fl
from functional_llm import losses, models, optim, testing

SETTINGS = settings(max_examples=8, deadline=None)


@SETTINGS
@given(cfg=testing.gpt_configs(), key=testing.keys(), data=st.data())
def test_gpt_is_causal_padding_blind_and_row_independent(cfg, key, data) -> None:
    model = models.GPT(cfg)
    params = model.init(key)
    tokens, valid = data.draw(testing.token_batches(cfg.vocab_size, max_len=cfg.max_seq_len))
    testing.check_causal(lambda t: model.apply(params, t), tokens, cfg.vocab_size)
    apply = lambda t, v: model.apply(params, t, valid=v)  # noqa: E731
    testing.check_padding_invariance(apply, tokens, valid, cfg.vocab_size)
    testing.check_batch_independence(apply, tokens, valid)
    testing.check_transforms_agree(apply, tokens, valid)


@SETTINGS
@given(cfg=testing.bert_configs(), key=testing.keys(), data=st.data())
def test_bert_is_padding_blind_and_row_independent(cfg, key, data) -> None:
    model = models.BERT(cfg)
    params = model.init(key)
    tokens, valid = data.draw(testing.token_batches(cfg.vocab_size, max_len=cfg.max_seq_len))
    apply = lambda t, v: model.apply(params, t, valid=v)  # noqa: E731
    testing.check_padding_invariance(apply, tokens, valid, cfg.vocab_size)
    testing.check_batch_independence(apply, tokens, valid)
    testing.check_transforms_agree(apply, tokens, valid)
    # bidirectional: the causal check must fail, unless d_model is 2, where post-LN states are
    # exactly (+-1, -+1) * scale + bias whatever the input (LayerNorm over two numbers)
    if tokens.shape[1] > 1 and cfg.vocab_size > 1 and cfg.d_model > 2:
        with pytest.raises(AssertionError, match="not causal"):  # exactly: with init's small
            testing.check_causal(  # weights, what later tokens change can be below 1e-5
                lambda t: model.apply(params, t).hidden, tokens, cfg.vocab_size, rtol=0, atol=0
            )


@SETTINGS
@given(cfg=testing.transformer_configs(), key=testing.keys(), data=st.data())
def test_the_encoder_decoder_hides_source_padding_and_is_causal_in_the_target(cfg, key, data):
    model = models.Transformer(cfg)
    params = model.init(key)
    src, src_valid = data.draw(testing.token_batches(cfg.src_vocab_size, max_batch=2))
    # a target one longer than the source: its logits are compared whole, not per source token
    tgt = fl.random.randint(key, (src.shape[0], src.shape[1] + 1), 0, cfg.tgt_vocab_size)
    apply = lambda s, v: model.apply(params, s, tgt, src_valid=v)  # noqa: E731
    testing.check_padding_invariance(apply, src, src_valid, cfg.src_vocab_size)
    testing.check_causal(lambda t: model.apply(params, src, t, src_valid=src_valid), tgt,
                         cfg.tgt_vocab_size)  # fmt: skip


def test_each_check_fails_on_what_breaks_its_property() -> None:
    cfg = models.GPTConfig(vocab_size=11, max_seq_len=8, d_model=8, n_layers=1, n_heads=2)
    model = models.GPT(cfg)
    params = model.init(fl.random.key(0))
    tokens = fl.random.randint(fl.random.key(1), (3, 6), 0, 11)
    valid = torch.arange(6) < torch.tensor([[6], [3], [1]])
    with pytest.raises(AssertionError, match="row 1 depends on the other rows"):
        testing.check_batch_independence(lambda t: model.apply(params, t).cumsum(0), tokens)
    leaky = lambda t, v: model.apply(params, t).flip(1)  # noqa: E731  (late tokens move early)
    with pytest.raises(AssertionError, match="padding is visible"):
        testing.check_padding_invariance(leaky, tokens, valid, 11)

    class WrongBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * x

        @staticmethod
        def backward(ctx, g):
            return g  # should be 2 x g

    with pytest.raises(AssertionError, match="finite differences give"):
        testing.check_gradients(lambda p: WrongBackward.apply(p["w"]).sum(), {"w": torch.ones(3)},
                                fl.random.key(0))  # fmt: skip

    def mutating_init(p):
        return {}

    def mutating_update(g, s, p=None):
        p["w"].add_(1.0)
        return g, s

    with pytest.raises(AssertionError, match="not bitwise equal"):
        testing.check_optimizer_pure(optim.GradientTransformation(mutating_init, mutating_update),
                                     {"w": torch.zeros(2)}, {"w": torch.ones(2)})  # fmt: skip


@SETTINGS
@given(cfg=testing.gpt_configs(max_layers=1), key=testing.keys())
def test_gpt_gradients_match_float64_finite_differences(cfg, key) -> None:
    model = models.GPT(models.GPTConfig(**{**cfg.__dict__, "dtype": torch.float64}))
    params = model.init(key)
    ids = fl.random.randint(key, (2, cfg.max_seq_len + 1), 0, cfg.vocab_size)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:]}
    loss = losses.next_token(model)
    testing.check_gradients(lambda p: loss(p, batch, None)[0], params, key)


@SETTINGS
@given(hyper=testing.adamw_hyperparams(), key=testing.keys())
def test_optimizers_are_pure_and_their_states_round_trip(hyper, key, tmp_path_factory) -> None:
    params = {"w": fl.random.normal(key, (4, 3)), "b": torch.zeros(3)}
    grads = fl.tree.map(lambda x: torch.ones_like(x) * 0.1, params)
    directory: Path = tmp_path_factory.mktemp("state")
    for opt in (optim.adamw(**hyper), optim.lion(hyper["learning_rate"]), optim.adafactor(1e-2)):
        testing.check_optimizer_pure(opt, params, grads)
        testing.check_state_round_trip(opt, params, grads, directory)
