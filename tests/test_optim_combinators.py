"""Purity, combinators, guards and schedules of the optimizer library."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functional_llm as fl
from functional_llm import optim, random


def tree_params(seed: int = 0):
    k = random.split(random.key(seed), 4)
    return {
        "w": random.normal(k[0], (4, 3)),
        "norm": {"scale": 1 + 0.1 * random.normal(k[1], (3,))},
        "b": random.normal(k[2], (3,)),
        "frozen": random.normal(k[3], (2, 2)),
    }


def grads_for(params, step: int):
    keys = random.split(random.fold_in(random.key(99), step), len(fl.tree.leaves(params)))
    return fl.tree.structure(params).unflatten(
        [random.normal(k, x.shape) for k, x in zip(keys, fl.tree.leaves(params), strict=True)]
    )


def clone(tree):
    return fl.tree.map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def identical(a, b) -> bool:
    la, lb = fl.tree.leaves(a), fl.tree.leaves(b)
    return fl.tree.structure(a) == fl.tree.structure(b) and all(
        torch.equal(x, y) for x, y in zip(la, lb, strict=True)
    )


no_decay = optim.labels_by_path(
    {"*norm*": "no_decay", "b": "no_decay", "frozen": "frozen"}, "decay"
)
OPTIMIZERS = {
    "sgd": optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": optim.adam(1e-2, weight_decay=0.01),
    "adamw_masked": optim.adamw(
        1e-2,
        weight_decay=0.1,
        mask=lambda p: fl.tree.map_with_path(lambda path, _: "norm" not in path, p),
    ),
    "rmsprop": optim.rmsprop(1e-2, momentum=0.9, centered=True, weight_decay=0.01),
    "adagrad": optim.adagrad(0.1, initial_accumulator_value=0.1),
    "lion": optim.lion(1e-3, weight_decay=0.1),
    "adafactor": optim.adafactor(1e-2, min_dim_size_to_factor=2, momentum=0.9),
    "lamb": optim.lamb(1e-2, weight_decay=0.01),
    "clip_chain": optim.chain(optim.clip_by_global_norm(1.0), optim.clip(0.5), optim.adam(1e-3)),
    "multi_transform": optim.multi_transform(
        {
            "decay": optim.adamw(1e-2, weight_decay=0.1),
            "no_decay": optim.adam(1e-2),
            "frozen": optim.set_to_zero(),
        },
        no_decay,
    ),
    "multi_steps": optim.MultiSteps(optim.adam(1e-2), 2),
    "inject": optim.inject_hyperparams(optim.adamw)(
        learning_rate=optim.warmup_cosine(1e-2, 2, 10), weight_decay=0.1
    ),
    "apply_if_finite": optim.apply_if_finite(optim.sgd(0.1, momentum=0.9), 3),
    "zero_nans": optim.chain(optim.zero_nans(), optim.sgd(0.1)),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_update_never_modifies_its_inputs(name):
    opt = OPTIMIZERS[name]
    params = tree_params()
    state = opt.init(params)
    for step in range(3):
        grads = grads_for(params, step)
        before = (clone(params), clone(grads), clone(state))
        updates, new_state = opt.update(grads, state, params)
        assert (
            identical(params, before[0])
            and identical(grads, before[1])
            and identical(state, before[2])
        )
        new_params = optim.apply_updates(params, updates)
        assert identical(params, before[0])
        params, state = new_params, new_state
    assert not identical(params, tree_params()), "the optimizer never moved the params"


def test_multi_transform_freezes_and_excludes_frozen_leaves_from_the_norm():
    params = tree_params()
    grads = grads_for(params, 0)
    grads["frozen"] = torch.full((2, 2), 1e6)  # would dominate any norm it were part of
    opt = optim.multi_transform(
        {
            "train": optim.chain(optim.clip_by_global_norm(1.0), optim.scale(-1.0)),
            "frozen": optim.set_to_zero(),
        },
        optim.labels_by_path({"frozen": "frozen"}, "train"),
    )
    updates, _ = opt.update(grads, opt.init(params), params)
    assert torch.equal(updates["frozen"], torch.zeros(2, 2))
    trained = {k: v for k, v in grads.items() if k != "frozen"}
    norm = optim.global_norm(trained)
    assert norm > 1.0
    for path, u in fl.tree.flatten(updates).items():
        if path != "frozen":
            torch.testing.assert_close(u, -fl.tree.flatten(trained)[path] / (norm + 1e-6))
    new = optim.apply_updates(params, updates)
    assert torch.equal(new["frozen"], params["frozen"])


def test_masked_passes_other_updates_through():
    params = tree_params()
    grads = grads_for(params, 0)
    opt = optim.masked(optim.scale(-3.0), lambda p: fl.tree.mask(p, "w"))
    updates, _ = opt.update(grads, opt.init(params), params)
    torch.testing.assert_close(updates["w"], -3 * grads["w"])
    assert updates["b"] is grads["b"] and updates["norm"]["scale"] is grads["norm"]["scale"]


def test_add_decayed_weights_with_a_mask():
    params = tree_params()
    zero = fl.tree.map(torch.zeros_like, params)
    opt = optim.add_decayed_weights(0.5, mask=lambda p: fl.tree.mask(p, "w", "b"))
    updates, _ = opt.update(zero, opt.init(params), params)
    torch.testing.assert_close(updates["w"], 0.5 * params["w"])
    torch.testing.assert_close(updates["b"], 0.5 * params["b"])
    assert torch.equal(updates["frozen"], torch.zeros(2, 2))


def test_adamw_mask_exempts_norms_from_decay():
    params = tree_params()
    zero = fl.tree.map(torch.zeros_like, params)
    opt = optim.adamw(
        0.1,
        weight_decay=0.5,
        mask=lambda p: fl.tree.map_with_path(lambda path, _: "norm" not in path, p),
    )
    updates, _ = opt.update(zero, opt.init(params), params)
    torch.testing.assert_close(updates["norm"]["scale"], torch.zeros(3))
    torch.testing.assert_close(updates["w"], -0.1 * 0.5 * params["w"])


@given(k=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_multi_steps_equals_one_step_on_the_mean_gradient(k, seed):
    params = tree_params(seed)
    acc, ref = optim.MultiSteps(optim.adam(0.1), k), optim.adam(0.1)
    s_acc, s_ref = acc.init(params), ref.init(params)
    p_acc = p_ref = params
    for cycle in range(2):
        micro = [grads_for(params, 10 * cycle + j + seed) for j in range(k)]
        for j, g in enumerate(micro):
            u, s_acc = acc.update(g, s_acc, p_acc)
            if j < k - 1:
                assert all(torch.equal(x, torch.zeros_like(x)) for x in fl.tree.leaves(u))
            p_acc = optim.apply_updates(p_acc, u)
        mean = fl.tree.map(lambda *gs: torch.stack(gs).mean(0), *micro)
        u, s_ref = ref.update(mean, s_ref, p_ref)
        p_ref = optim.apply_updates(p_ref, u)
        for a, b in zip(fl.tree.leaves(p_acc), fl.tree.leaves(p_ref), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert int(s_acc.mini_step) == 0


def test_inject_hyperparams_follows_the_schedule_and_takes_overrides():
    schedule = optim.linear(0.0, 1.0, 4)
    opt = optim.inject_hyperparams(optim.sgd)(learning_rate=schedule, momentum=0.0)
    params = {"w": torch.ones(2)}
    g = {"w": torch.ones(2)}
    state = opt.init(params)
    lrs = []
    for _ in range(3):
        u, state = opt.update(g, state, params)
        lrs.append(float(state.hyperparams["learning_rate"]))
        torch.testing.assert_close(u["w"], -lrs[-1] * g["w"])
    assert lrs == [0.0, 0.25, 0.5]
    constant = optim.inject_hyperparams(optim.adamw)(learning_rate=0.1, weight_decay=0.0)
    state = constant.init(params)
    state = state._replace(hyperparams={**state.hyperparams, "learning_rate": torch.tensor(0.5)})
    u, state = constant.update(g, state, params)
    torch.testing.assert_close(u["w"], torch.full((2,), -0.5))  # Adam's first step is -lr sign(g)
    assert float(state.hyperparams["learning_rate"]) == 0.5  # an override persists


def test_apply_if_finite_skips_and_counts():
    opt = optim.apply_if_finite(optim.sgd(1.0, momentum=0.5), max_consecutive_errors=2)
    params = {"w": torch.ones(2)}
    state = opt.init(params)
    u, state = opt.update({"w": torch.tensor([1.0, 2.0])}, state, params)
    trace_before = state.inner_state
    u, state = opt.update({"w": torch.tensor([float("inf"), 0.0])}, state, params)
    assert torch.equal(u["w"], torch.zeros(2)) and identical(state.inner_state, trace_before)
    assert (
        int(state.total_notfinite) == 1
        and int(state.notfinite_count) == 1
        and not bool(state.last_finite)
    )
    u, state = opt.update({"w": torch.tensor([1.0, 1.0])}, state, params)
    assert int(state.notfinite_count) == 0 and int(state.total_notfinite) == 1
    torch.testing.assert_close(u["w"], -(torch.tensor([1.0, 1.0]) + 0.5 * torch.tensor([1.0, 2.0])))
    nan = {"w": torch.tensor([float("nan"), 0.0])}
    for expected_skip in (True, True, False):  # the third in a row exceeds max_consecutive_errors
        u, state = opt.update(nan, state, params)
        assert bool(torch.equal(u["w"], torch.zeros(2))) == expected_skip


def test_zero_nans_and_clip():
    u, s = optim.zero_nans().update(
        {"w": torch.tensor([float("nan"), 2.0])}, optim.zero_nans().init(None)
    )
    assert torch.equal(u["w"], torch.tensor([0.0, 2.0])) and bool(s.found_nan)
    u, _ = optim.clip(1.0).update({"w": torch.tensor([-3.0, 0.5, 2.0])}, optim.EmptyState())
    assert torch.equal(u["w"], torch.tensor([-1.0, 0.5, 1.0]))


def test_clip_by_global_norm_matches_torch():
    grads = grads_for(tree_params(), 0)
    ref = [g.clone() for g in fl.tree.leaves(grads)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in ref]
    for p, g in zip(params, ref, strict=True):
        p.grad = g
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    u, _ = optim.clip_by_global_norm(0.5).update(grads, optim.EmptyState())
    for a, p in zip(fl.tree.leaves(u), params, strict=True):
        torch.testing.assert_close(a, p.grad)


def test_schedules():
    wc = optim.warmup_cosine(1.0, 10, 110, init_value=0.1, end_value=0.01)
    assert math.isclose(float(wc(0)), 0.1, rel_tol=1e-6) and math.isclose(
        float(wc(10)), 1.0, rel_tol=1e-6
    )
    assert math.isclose(float(wc(60)), 0.01 + 0.99 * 0.5, rel_tol=1e-6)
    assert math.isclose(float(wc(110)), 0.01, rel_tol=1e-5) and math.isclose(
        float(wc(500)), 0.01, rel_tol=1e-5
    )
    assert math.isclose(float(wc(torch.tensor(5))), 0.1 + 0.9 * 0.5, rel_tol=1e-6)
    wsd = optim.warmup_stable_decay(2.0, 4, 10, 6, end_value=0.5)
    assert [round(float(wsd(t)), 4) for t in (0, 2, 4, 13, 14, 17, 20, 30)] == [
        0.0,
        1.0,
        2.0,
        2.0,
        2.0,
        1.25,
        0.5,
        0.5,
    ]
    pc = optim.piecewise_constant(1.0, {5: 0.1, 8: 0.5})
    assert [round(float(pc(t)), 4) for t in (0, 5, 7, 8, 100)] == [1.0, 0.1, 0.1, 0.05, 0.05]
    cd = optim.cosine_decay(2.0, 100, alpha=0.1)
    assert math.isclose(float(cd(50)), 2.0 * (0.9 * 0.5 + 0.1), rel_tol=1e-6)
    assert float(optim.constant(3.0)(7)) == 3.0
    with pytest.raises(ValueError, match="decay_steps"):
        optim.warmup_cosine(1.0, 10, 5)


def test_errors_are_clear():
    params = tree_params()
    opt = optim.multi_transform({"a": optim.sgd(0.1)}, optim.labels_by_path({}, "b"))
    with pytest.raises(ValueError, match=r"labels \['b'\] have no transform"):
        opt.init(params)
    with pytest.raises(ValueError, match="add_decayed_weights needs params"):
        optim.add_decayed_weights(0.1).update(params, optim.EmptyState())
