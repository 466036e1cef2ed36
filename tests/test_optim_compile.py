"""Compiled updates equal eager ones and compile once: step, learning rate and overrides
are tensors in the state, never Python values baked into the graph."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import functional_llm as fl
from functional_llm import optim, random

STEPS = 50


def problem():
    k = random.split(random.key(0), 3)
    params = {
        "w": random.normal(k[0], (16, 8)),
        "blocks": [{"b": random.normal(k[1], (8,))}],
        "norm": torch.ones(8),
    }
    target = fl.tree.map(lambda x: torch.zeros_like(x) + 0.5, params)
    return params, lambda p: fl.tree.map(lambda x, t: 2.0 * (x - t), p, target)


def trajectories(opt, override_at=None):
    params, grad = problem()

    def step(p, s):
        updates, s = opt.update(grad(p), s, p)
        return optim.apply_updates(p, updates), s

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    runs = []
    for fn in (step, compiled):
        p, s = params, opt.init(params)
        for i in range(STEPS):
            if override_at is not None and i == override_at:
                s = override_at_fn(s)
            p, s = fn(p, s)
        runs.append((p, s))
    return runs, counter.frame_count


def override_at_fn(state):
    return state._replace(hyperparams={**state.hyperparams, "learning_rate": torch.tensor(3e-3)})


def assert_same(a, b):
    fl.testing.assert_trees_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # 50 compiled steps (--full tier; the override tests below stay fast)
def test_compiled_adamw_with_warmup_cosine_equals_eager_and_compiles_once():
    opt = optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.adamw(
            optim.warmup_cosine(1e-2, 10, STEPS, end_value=1e-3), b2=0.99, weight_decay=0.1
        ),
    )
    (eager, compiled), frames = trajectories(opt)
    assert_same(eager, compiled)
    assert frames == 1


def test_compiled_combinators_take_run_time_overrides_without_recompiling():
    inner = optim.inject_hyperparams(optim.adamw)(learning_rate=1e-2, weight_decay=0.1)
    opt = optim.apply_if_finite(
        optim.multi_transform(
            {"train": optim.MultiSteps(inner, 2), "frozen": optim.set_to_zero()},
            optim.labels_by_path({"norm": "frozen"}, "train"),
        )
    )
    (eager, compiled), frames = trajectories(opt, override_at=None)
    assert_same(eager, compiled)
    assert frames == 1
    assert torch.equal(compiled[0]["norm"], torch.ones(8))


def test_overriding_the_learning_rate_does_not_recompile():
    opt = optim.inject_hyperparams(optim.adamw)(learning_rate=1e-2, weight_decay=0.1)
    (eager, compiled), frames = trajectories(opt, override_at=25)
    assert_same(eager, compiled)
    assert frames == 1
    assert float(compiled[1].hyperparams["learning_rate"]) == torch.tensor(3e-3).item()
