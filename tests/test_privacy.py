"""Per-example gradients and DP-SGD: vmap of grad equals the loop of single-example gradients,
clipping and noise do what their definitions say, DP-SGD without noise or clipping is plain
SGD, and the RDP accountant matches opacus' published value and its own computation."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functional_llm as fl
from functional_llm import losses, optim, privacy, random, train
from functional_llm.testing import assert_trees_close

CFG = fl.models.GPTConfig(vocab_size=29, max_seq_len=12, d_model=16, n_layers=2, n_heads=2,
                          bias=False)  # fmt: skip


def _batch(seed: int, b: int = 5) -> dict[str, torch.Tensor]:
    tokens = random.randint(random.key(seed), (b, 13), 0, 29)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_per_example_gradients_equal_the_loop_of_single_examples(dropout: float) -> None:
    model = fl.models.GPT(fl.models.GPTConfig(**{**CFG.__dict__, "dropout": dropout}))
    params = model.init(random.key(0))
    loss_fn = losses.next_token(model)
    batch, key = _batch(1), (random.key(3) if dropout else None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # attention batches under vmap: no fallback loop
        per_loss, per_grad = privacy.per_example_grads(loss_fn, params, batch, key)
    for i in range(5):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        k = None if key is None else random.fold_in(key, i)
        (loss, _), grads = train.value_and_grad(loss_fn)(params, one, k)
        torch.testing.assert_close(per_loss[i], loss, rtol=1e-5, atol=1e-6)
        assert_trees_close(fl.tree.map(lambda g, i=i: g[i], per_grad), grads, rtol=1e-4, atol=1e-6)


def test_dp_sgd_without_noise_or_clipping_is_plain_sgd() -> None:
    model = fl.models.GPT(CFG)
    loss_fn = losses.next_token(model)  # every target counted: the batch mean is the mean of
    opt = optim.sgd(0.5)  # the examples' means
    state = train.init_state(model.init(random.key(0)), opt, random.key(1))
    dp = privacy.make_dp_step(loss_fn, opt, l2_clip=math.inf, noise_multiplier=0.0)
    plain = train.make_step(loss_fn, opt)
    a, b = state, state
    for s in range(3):
        a, ma = dp(a, _batch(s))
        b, mb = plain(b, _batch(s))
        torch.testing.assert_close(ma["loss"], mb["loss"], rtol=1e-5, atol=1e-6)
        assert float(ma["clipped"]) == 0.0
    assert_trees_close(a.params, b.params, rtol=1e-4, atol=1e-6)


def test_clipping_bounds_each_example_and_noise_has_the_stated_scale() -> None:
    grads = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]]), "b": torch.zeros(3, 1)}
    mean, clipped = privacy.clip_and_noise(grads, l2_clip=1.0, noise_multiplier=0.0, key=None)
    # example 0 (norm 5) is scaled to norm 1, example 1 (norm 0.5) is kept
    torch.testing.assert_close(
        mean["w"], torch.tensor([0.6 + 0.3, 0.8 + 0.4]) / 3, rtol=1e-5, atol=1e-6
    )
    assert float(clipped) == pytest.approx(1 / 3)
    zeros = {"w": torch.zeros(4, 200, 100)}
    noisy, _ = privacy.clip_and_noise(zeros, l2_clip=0.5, noise_multiplier=2.0, key=random.key(0))
    assert float(noisy["w"].std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.02)
    again, _ = privacy.clip_and_noise(zeros, l2_clip=0.5, noise_multiplier=2.0, key=random.key(0))
    assert torch.equal(noisy["w"], again["w"])  # the noise is a function of the key


def test_dp_aggregate_composes_with_an_optimizer() -> None:
    per_example = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
    params = {"w": torch.zeros(2)}
    agg = privacy.dp_aggregate(l2_clip=1.0, noise_multiplier=0.0, key=random.key(0))
    update, state = agg.update(per_example, agg.init(params), params)
    torch.testing.assert_close(update["w"], torch.tensor([0.45, 0.6]), rtol=1e-5, atol=1e-6)
    assert int(state["count"]) == 1


def test_the_accountant_matches_opacus_published_value() -> None:
    # opacus' tests/accountants_test.py: sigma 1.5, q 0.04, 90 epochs, delta 1e-5 -> 7.32911117143
    eps, order = privacy.epsilon(0.04, 1.5, int(90 / 0.04), 1e-5)
    assert eps == pytest.approx(7.32911117143, abs=1e-7)
    assert order == 3.9


@settings(max_examples=40, deadline=None)
@given(
    q=st.sampled_from([1e-3, 4e-3, 0.01, 0.05, 0.3, 1.0]),
    sigma=st.floats(0.4, 6.0),
    steps=st.integers(1, 20_000),
    delta=st.sampled_from([1e-5, 1e-6, 1e-3]),
)
def test_the_accountant_equals_opacus_rdp_analysis(
    q: float, sigma: float, steps: int, delta: float
) -> None:
    analysis = pytest.importorskip("opacus.accountants.analysis.rdp")
    orders = list(privacy.DEFAULT_ORDERS)
    want = analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    # our integer orders sum exact binomials, opacus' scipy's floating ones: rounding apart
    assert privacy.rdp(q, sigma, steps, orders) == pytest.approx(list(want), rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opacus warns when the best order is at an end
        eps, order = analysis.get_privacy_spent(orders=orders, rdp=want, delta=delta)
    assert privacy.epsilon(q, sigma, steps, delta) == pytest.approx(
        (float(eps), float(order)), rel=1e-6
    )


def test_bad_privacy_settings_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="noise_multiplier must be >= 0, got -1"):
        privacy.make_dp_step(lambda p, b, k: (torch.zeros(()), {}), optim.sgd(0.1), l2_clip=1.0,
                             noise_multiplier=-1.0)  # fmt: skip
    with pytest.raises(ValueError, match="l2_clip must be positive"):
        privacy.dp_aggregate(0.0, 1.0, random.key(0))
    with pytest.raises(ValueError, match="delta must be in"):
        privacy.epsilon(0.01, 1.0, 10, 0.0)
    with pytest.raises(ValueError, match="disagree on the batch size"):
        privacy.per_example_grads(lambda p, b, k: (torch.zeros(()), {}), {}, {
            "inputs": torch.zeros(3, 2), "targets": torch.zeros(4, 2)})  # fmt: skip
