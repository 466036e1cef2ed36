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


def _steps(opt, grads):
    """The updates of ``opt`` for a sequence of float64 gradients of one leaf."""
    params = {"w": torch.zeros_like(grads[0], dtype=torch.float64)}
    state, out = opt.init(params), []
    for g in grads:
        u, state = opt.update({"w": g.double()}, state, params)
        out.append(u["w"].numpy())
    return out


GRADS = [torch.tensor([0.0, 1e-5, -0.3, 2.0]), torch.tensor([0.0, -2e-5, 0.5, 1.0])]


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("eps_in_sqrt", [False, True])
def test_rmsprop_eps_in_or_outside_the_root(centered, eps_in_sqrt):
    """torch.optim.RMSprop's ``g / (sqrt(v) + eps)``, or Optax's ``g / sqrt(v + eps)``
    (``scale_by_rms``; ``scale_by_stddev`` when centered), on gradients whose ``v`` is 0 or
    near ``eps``, where the two differ."""
    decay, eps, lr = 0.9, 1e-8, 0.1
    v, m, want = np.zeros(4), np.zeros(4), []
    for g in (g.double().numpy() for g in GRADS):
        v = decay * v + (1 - decay) * g**2
        m = decay * m + (1 - decay) * g if centered else m
        var = v - m**2
        denom = np.sqrt(var + eps) if eps_in_sqrt else np.sqrt(var) + eps
        want.append(-lr * g / denom)
    opt = optim.rmsprop(lr, alpha=decay, eps=eps, centered=centered, eps_in_sqrt=eps_in_sqrt)
    for got, w in zip(_steps(opt, GRADS), want, strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-12, atol=0)


@pytest.mark.parametrize("eps_in_sqrt", [False, True])
def test_adagrad_eps_in_or_outside_the_root(eps_in_sqrt):
    """torch.optim.Adagrad's ``g / (sqrt(s) + eps)``, or Optax's ``g / sqrt(s + eps)`` with a
    zero update where ``s = 0`` (Optax's defaults: accumulator 0.1, eps 1e-7; here 0 so that
    the ``s = 0`` case occurs)."""
    eps, lr = 1e-7, 0.1
    s, want = np.zeros(4), []
    for g in (g.double().numpy() for g in GRADS):
        s = s + g**2
        if eps_in_sqrt:
            with np.errstate(divide="ignore", invalid="ignore"):
                u = np.where(s > 0, g / np.sqrt(s + eps), 0.0)
        else:
            u = g / (np.sqrt(s) + eps)
        want.append(-lr * u)
    opt = optim.adagrad(lr, eps=eps, eps_in_sqrt=eps_in_sqrt)
    for got, w in zip(_steps(opt, GRADS), want, strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-12, atol=0)


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_clip_by_global_norm_torch_and_optax_rules(scale):
    """``eps=1e-6`` is ``clip_grad_norm_``'s ``min(1, c / (||g|| + 1e-6))``; ``eps=0`` is
    Optax's ``g if ||g|| < c else g c / ||g||``, which leaves a gradient of norm exactly ``c``
    as it is."""
    g = np.array([3.0, -4.0, 0.0]) / 5 * scale  # norm = scale
    c, norm = 1.0, np.linalg.norm(g)
    torch_rule = g * min(1.0, c / (norm + 1e-6))
    optax_rule = g if norm < c else g * c / norm
    for opt, want in ((optim.clip_by_global_norm(c), torch_rule),
                      (optim.clip_by_global_norm(c, eps=0.0), optax_rule)):  # fmt: skip
        u, _ = opt.update({"w": torch.tensor(g)}, opt.init({"w": torch.zeros(3)}))
        np.testing.assert_allclose(u["w"].numpy(), want, rtol=1e-15, atol=0)
    params = {"w": torch.tensor(g)}
    reference = params["w"].clone().requires_grad_(True)
    reference.grad = torch.tensor(g)
    torch.nn.utils.clip_grad_norm_([reference], c)
    u, _ = optim.clip_by_global_norm(c).update(params, None)
    torch.testing.assert_close(u["w"], reference.grad, rtol=1e-15, atol=0)
