"""Trajectory parity with torch.optim: 20 steps on hypothesis-drawn shapes and
hyperparameters give the same parameters within 1e-6 relative (fp32).

The parameters are O(1) (standard normal draws pulled towards normal targets), so the
absolute tolerance of 1e-6 is 1e-6 relative to their scale. A purely elementwise relative
bound cannot hold where a parameter crosses zero: ``p - lr g`` with ``p ~ lr g ~ 0.5`` leaves
a result near 0 carrying the rounding error (~6e-8) of its O(1) operands, and torch fuses
``p.add_(g, alpha=-lr)`` where we round ``-lr g`` first.
"""

import torch
from hypothesis import given
from hypothesis import strategies as st

import functional_llm as fl
from functional_llm import optim, random

STEPS = 20
shapes = st.lists(
    st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=3
)


def make_problem(seed: int, shape_list):
    """Params, and a gradient that depends on them (a quadratic loss), so errors feed back."""
    keys = random.split(random.key(seed), 3 * len(shape_list))
    params = {f"p{i}": random.normal(keys[3 * i], s) for i, s in enumerate(shape_list)}
    curv = {
        f"p{i}": random.uniform(keys[3 * i + 1], s, low=0.5, high=2.0)
        for i, s in enumerate(shape_list)
    }
    target = {f"p{i}": random.normal(keys[3 * i + 2], s) for i, s in enumerate(shape_list)}

    def grad(p):
        return {k: curv[k] * (p[k] - target[k]) for k in p}

    return params, grad


def run_both(ours, make_torch, params, grad):
    state = ours.init(params)
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    torch_opt = make_torch(list(ref.values()))
    p = params
    for _ in range(STEPS):
        updates, state = ours.update(grad(p), state, p)
        p = optim.apply_updates(p, updates)
        g = grad({k: v.detach() for k, v in ref.items()})
        for k, v in ref.items():
            v.grad = g[k]
        torch_opt.step()
        for k in p:
            torch.testing.assert_close(p[k], ref[k].detach(), rtol=1e-6, atol=1e-6)


lrs = st.sampled_from([1e-3, 1e-2, 0.1])
decays = st.sampled_from([0.0, 1e-2, 0.1])


@given(
    seed=st.integers(0, 2**31),
    s=shapes,
    lr=lrs,
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    nesterov=st.booleans(),
    wd=decays,
)
def test_sgd(seed, s, lr, momentum, nesterov, wd):
    nesterov = nesterov and momentum > 0
    params, grad = make_problem(seed, s)
    run_both(
        optim.sgd(lr, momentum, nesterov, wd),
        lambda ps: torch.optim.SGD(
            ps, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd
        ),
        params,
        grad,
    )


betas = st.tuples(st.sampled_from([0.8, 0.9]), st.sampled_from([0.99, 0.999]))
epss = st.sampled_from([1e-8, 1e-6, 1e-3])


@given(seed=st.integers(0, 2**31), s=shapes, lr=lrs, b=betas, eps=epss, wd=decays)
def test_adam(seed, s, lr, b, eps, wd):
    params, grad = make_problem(seed, s)
    run_both(
        optim.adam(lr, *b, eps, wd),
        lambda ps: torch.optim.Adam(ps, lr=lr, betas=b, eps=eps, weight_decay=wd, foreach=True),
        params,
        grad,
    )


@given(seed=st.integers(0, 2**31), s=shapes, lr=lrs, b=betas, eps=epss, wd=decays)
def test_adamw(seed, s, lr, b, eps, wd):
    params, grad = make_problem(seed, s)
    run_both(
        optim.adamw(lr, *b, eps, wd),
        lambda ps: torch.optim.AdamW(ps, lr=lr, betas=b, eps=eps, weight_decay=wd, foreach=True),
        params,
        grad,
    )


@given(
    seed=st.integers(0, 2**31), s=shapes, lr=st.sampled_from([1e-3, 1e-2]),
    alpha=st.sampled_from([0.9, 0.99]), eps=epss, wd=decays, momentum=st.sampled_from([0.0, 0.9]),
    centered=st.booleans(),
)  # fmt: skip
def test_rmsprop(seed, s, lr, alpha, eps, wd, momentum, centered):
    params, grad = make_problem(seed, s)
    run_both(
        optim.rmsprop(lr, alpha, eps, wd, momentum, centered),
        lambda ps: torch.optim.RMSprop(
            ps, lr=lr, alpha=alpha, eps=eps, weight_decay=wd, momentum=momentum, centered=centered
        ),
        params,
        grad,
    )


@given(
    seed=st.integers(0, 2**31),
    s=shapes,
    lr=lrs,
    init=st.sampled_from([0.0, 0.1]),
    eps=st.sampled_from([1e-10, 1e-6]),
    wd=decays,
)
def test_adagrad(seed, s, lr, init, eps, wd):
    params, grad = make_problem(seed, s)
    run_both(
        optim.adagrad(lr, init, eps, wd),
        lambda ps: torch.optim.Adagrad(
            ps, lr=lr, initial_accumulator_value=init, eps=eps, weight_decay=wd
        ),
        params,
        grad,
    )


def test_schedule_driven_learning_rate_matches_torch_lambda_lr():
    params, grad = make_problem(0, [(3, 4), (5,)])
    schedule = optim.warmup_cosine(1e-2, 5, STEPS, end_value=1e-3)

    def make_torch(ps):
        opt = torch.optim.AdamW(ps, lr=1.0, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: float(schedule(step)))
        step = opt.step

        def step_and_schedule():
            step()
            sched.step()

        opt.step = step_and_schedule
        return opt

    run_both(optim.adamw(schedule, weight_decay=0.1), make_torch, params, grad)
    assert fl.tree.size(params) == 17
