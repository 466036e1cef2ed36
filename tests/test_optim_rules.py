"""Lion, Adafactor and LAMB against their published update rules on hand-computed cases, and
the edge cases where schedules and momentum follow Optax."""

import numpy as np
import pytest
import torch

from functional_llm import optim


def run(opt, params, grads):
    state = opt.init(params)
    for g in grads:
        updates, state = opt.update(g, state, params)
        params = optim.apply_updates(params, updates)
    return params, state


def test_lion_two_steps():
    # Step 1: c = 0.1 g, sign [1, -1]; p = p - 0.1 (sign + 0.5 p) = [0.85, -1.8]; m = 0.01 g.
    # Step 2: c = 0.9 m + 0.1 g2 = [0.0035, 0.0191] -> sign [1, 1] although g2[0] < 0.
    p = {"w": torch.tensor([1.0, -2.0])}
    grads = [{"w": torch.tensor([0.5, -0.1])}, {"w": torch.tensor([-0.01, 0.2])}]
    out, state = run(optim.lion(0.1, weight_decay=0.5), p, grads)
    torch.testing.assert_close(out["w"], torch.tensor([0.85 - 0.1 * 1.425, -1.8 - 0.1 * (1 - 0.9)]))
    # m after two steps: 0.99 (0.01 g1) + 0.01 g2
    torch.testing.assert_close(state[0].mu["w"], 0.99 * 0.01 * grads[0]["w"] + 0.01 * grads[1]["w"])


def test_lamb_one_step():
    p = np.array([3.0, 4.0])
    g = np.array([1.0, 0.0])
    lr, wd, eps = 0.1, 0.1, 1e-6
    adam = g / (np.abs(g) + eps)  # first step: bias-corrected m/sqrt(v) = g / |g|
    u = adam + wd * p
    ratio = np.linalg.norm(p) / np.linalg.norm(u)
    want = p - lr * ratio * u
    out, _ = run(
        optim.lamb(lr, eps=eps, weight_decay=wd),
        {"w": torch.tensor(p, dtype=torch.float32)},
        [{"w": torch.tensor(g, dtype=torch.float32)}],
    )
    np.testing.assert_allclose(out["w"].numpy(), want, rtol=1e-6)


def test_lamb_trust_ratio_is_per_leaf_and_one_for_zero_params():
    params = {"a": torch.zeros(3), "b": torch.full((2,), 10.0)}
    grads = {"a": torch.ones(3), "b": torch.ones(2)}
    out, _ = run(optim.lamb(1.0, eps=0.0), params, [grads])
    torch.testing.assert_close(out["a"], -torch.ones(3))  # ||p|| = 0: ratio 1, adam step of 1
    torch.testing.assert_close(
        out["b"], torch.full((2,), 0.0)
    )  # ratio ||p||/||u|| = 10: step of 10


def adafactor_reference(p, grads, lr, eps=1e-30, decay_rate=0.8, threshold=1.0, param_scale=True):
    """The paper's Algorithm 4 (factored) in float64, for a 2-D ``p`` (rows < cols)."""
    p = p.copy()
    R, C = np.zeros(p.shape[0]), np.zeros(p.shape[1])
    for t, g in enumerate(grads, start=1):
        b = 1.0 - t**-decay_rate
        sq = g**2 + eps
        R = b * R + (1 - b) * sq.mean(axis=1)
        C = b * C + (1 - b) * sq.mean(axis=0)
        V = np.outer(R, C) / R.mean()
        u = g / np.sqrt(V)
        u = u / max(1.0, np.sqrt((u**2).mean()) / threshold)
        scale = max(np.sqrt((p**2).mean()), 1e-3) if param_scale else 1.0
        p = p - lr * scale * u
    return p, R, C


def test_adafactor_factored_two_steps():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(2, 3))
    grads = [rng.normal(size=(2, 3)) for _ in range(2)]
    want, R, C = adafactor_reference(p, grads, lr=0.1)
    opt = optim.adafactor(0.1, min_dim_size_to_factor=1)
    to = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    out, state = run(opt, {"w": to(p)}, [{"w": to(g)} for g in grads])
    np.testing.assert_allclose(out["w"].numpy(), want, rtol=1e-10)
    v = state[0].v["w"]
    assert set(v) == {"row", "col"} and v["row"].shape == (2,) and v["col"].shape == (3,)
    np.testing.assert_allclose(v["row"].numpy(), R, rtol=1e-10)
    np.testing.assert_allclose(v["col"].numpy(), C, rtol=1e-10)


def test_adafactor_unfactored_leaves_keep_full_second_moments():
    # A vector (or a matrix below min_dim_size_to_factor): v = b v + (1 - b)(g^2 + eps).
    g1, g2 = np.array([0.5, -2.0, 0.1]), np.array([1.0, 1.0, -3.0])
    b2 = 1.0 - 2.0**-0.8
    v = b2 * (g1**2) + (1 - b2) * g2**2
    u2 = g2 / np.sqrt(v)
    u2 = u2 / max(1.0, np.sqrt((u2**2).mean()))
    p0 = np.array([1.0, 1.0, 1.0])
    p1 = p0 - 0.01 * (g1 / np.abs(g1))  # step 1: u = sign(g), rms 1, param rms 1
    want = p1 - 0.01 * max(np.sqrt((p1**2).mean()), 1e-3) * u2
    opt = optim.adafactor(0.01)
    to = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    out, state = run(opt, {"b": to(p0)}, [{"b": to(g1)}, {"b": to(g2)}])
    np.testing.assert_allclose(out["b"].numpy(), want, rtol=1e-10)
    assert set(state[0].v["b"]) == {"full"}


def test_adafactor_momentum_is_a_moving_average_of_its_updates():
    """Optax's and the paper's rule (``b = m b + (1 - m) u``), not an accumulated sum, whose
    steps would be ``1 / (1 - m)`` times larger."""
    kw = dict(min_dim_size_to_factor=2, multiply_by_parameter_scale=False)
    with_momentum, plain = optim.adafactor(0.1, momentum=0.9, **kw), optim.adafactor(0.1, **kw)
    params = {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(0))}
    s_m, s_p = with_momentum.init(params), plain.init(params)
    average = torch.zeros(4, 3)
    for t in range(5):
        grads = {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(t + 1))}
        u_m, s_m = with_momentum.update(grads, s_m, params)
        u_p, s_p = plain.update(grads, s_p, params)
        average = 0.9 * average + 0.1 * u_p["w"]
        torch.testing.assert_close(u_m["w"], average, rtol=1e-5, atol=1e-7)


def test_schedule_edge_cases_follow_optax():
    held = optim.linear(1.0, 0.0, transition_steps=0)  # no transition: the initial value
    assert [float(held(t)) for t in (0, 1, 100)] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"decay_steps \(5\) must be > warmup_steps \(5\)"):
        optim.warmup_cosine(1.0, 5, 5)
