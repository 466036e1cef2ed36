"""The train step: the gradient path, compile-once, accumulation, clipping, precision,
donation, remat, and steps composed by users without touching library code."""

import dataclasses

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend

import functional_llm as fl
from functional_llm import losses, optim, random, train
from functional_llm.losses import IGNORE
from functional_llm.testing import assert_trees_close, assert_trees_equal

# No biases: the key projection's bias gets an exactly-zero gradient (softmax is invariant to a
# per-query shift), so Adam would turn rounding noise of ~1e-9 into full-size updates whose sign
# differs between any two evaluation orders (eager vs compiled, 1 vs k micro-batches).
CFG = fl.models.GPTConfig(
    vocab_size=17, max_seq_len=16, d_model=16, n_layers=2, n_heads=2, bias=False
)


def setup(cfg=CFG, schedule=1e-2, **opt_kw):
    model = fl.models.GPT(cfg)
    params = model.init(random.key(0))
    # nanoGPT's decay mask: a callable, resolved once per tree structure, compiled as constants.
    decay_matrices = lambda p: fl.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731
    opt = optim.adamw(schedule, b2=0.99, weight_decay=0.1, mask=decay_matrices, **opt_kw)
    return model, params, opt, train.init_state(params, opt, random.key(1))


def batch(i, b=4, t=9, vocab=17, ignore_fraction=0.0):
    k = random.split(random.fold_in(random.key(7), i), 2)
    tokens = random.randint(k[0], (b, t), 0, vocab)
    targets = torch.where(random.uniform(k[1], (b, t - 1)) < ignore_fraction, IGNORE, tokens[:, 1:])
    return {"inputs": tokens[:, :-1], "targets": targets}


def test_value_and_grad_equals_torch_func_and_leaves_params_untouched():
    model, params, _, _ = setup()
    params = {"model": params, "buffer": torch.arange(3)}  # an integer leaf gets no gradient

    def loss_fn(p, b):
        return losses.next_token(model)(p["model"], b)

    before = optree.tree_map(torch.clone, params)
    (loss, aux), grads = train.value_and_grad(loss_fn)(params, batch(0))
    (loss_f, _), grads_f = train.value_and_grad(loss_fn, method="func")(params, batch(0))
    torch.testing.assert_close(loss, loss_f)
    assert grads["buffer"] is None
    del grads["buffer"], grads_f["buffer"]
    assert_trees_close(grads, grads_f, rtol=1e-5, atol=1e-7)
    assert_trees_equal(params, before)
    assert not any(x.requires_grad for x in optree.tree_leaves(params))
    assert not loss.requires_grad and "accuracy" in aux


def test_value_and_grad_gives_zeros_for_params_the_loss_does_not_use():
    params = {"used": torch.ones(3), "unused": torch.ones(2)}
    (_, _), grads = train.value_and_grad(lambda p: ((p["used"] ** 2).sum(), {}))(params)
    torch.testing.assert_close(grads["used"], 2 * torch.ones(3))
    torch.testing.assert_close(grads["unused"], torch.zeros(2))


def run(step, state, n, **batch_kw):
    history = []
    for i in range(n):
        state, metrics = step(state, batch(i, **batch_kw))
        history.append(metrics)
    return state, history


@pytest.mark.slow  # compiles a whole step (--full tier)
def test_compiled_step_equals_eager_and_compiles_once():
    schedule = optim.warmup_cosine(1e-2, 3, 12, end_value=1e-3)
    cfg = dataclasses.replace(CFG, dropout=0.1)  # keys drive dropout: a tensor, folded per step
    model, params, _, _ = setup(cfg)
    opt = optim.inject_hyperparams(optim.adamw)(schedule, b2=0.99, weight_decay=0.1)
    state = train.init_state(params, opt, random.key(1))
    step = train.make_step(losses.next_token(model), opt, clip_norm=0.5, accumulate=2)
    counter = CompileCounterWithBackend("inductor")
    compiled = train.compile(step, backend=counter)
    eager_state, eager_hist = run(step, state, 12)
    compiled_state, compiled_hist = run(compiled, state, 12)
    assert counter.frame_count == 1
    assert_trees_close(compiled_state.params, eager_state.params, rtol=1e-4, atol=1e-5)
    for e, c in zip(eager_hist, compiled_hist, strict=True):
        torch.testing.assert_close(c["loss"], e["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c["learning_rate"], e["learning_rate"])
    for i, record in enumerate(eager_hist):  # the rate each step used, read from the state
        torch.testing.assert_close(record["learning_rate"], schedule(torch.tensor(i)))
    assert int(compiled_state.step) == 12


@settings(max_examples=8)
@given(k=st.sampled_from([2, 4]), seed=st.integers(0, 1000))
def test_accumulated_micro_batches_equal_one_large_batch(k, seed):
    """SGD makes the update the gradient itself (Adam's first step is ~lr sign(g), which turns
    1e-9 rounding differences on near-zero gradient entries into lr-sized ones)."""
    model, params, _, _ = setup()
    opt = optim.sgd(1.0)
    state = train.init_state(params, opt, random.key(1))
    big = batch(seed, b=8, ignore_fraction=0.4)  # micro-batches count different token numbers
    one = train.make_step(losses.next_token(model), opt, clip_norm=1.0)
    acc = train.make_step(losses.next_token(model), opt, clip_norm=1.0, accumulate=k)
    s1, m1 = one(state, big)
    sk, mk = acc(state, big)
    assert_trees_close(sk.params, s1.params, rtol=1e-5, atol=1e-6)
    for name in ("loss", "grad_norm", "accuracy", "tokens"):
        torch.testing.assert_close(mk[name], m1[name], rtol=1e-5, atol=1e-6)


def test_accumulate_must_divide_the_batch():
    model, _, opt, state = setup()
    step = train.make_step(losses.next_token(model), opt, accumulate=3)
    with pytest.raises(ValueError, match="accumulate=3 must divide the batch size"):
        step(state, batch(0, b=4))


def test_clipping_matches_torch_clip_grad_norm():
    model, params, _, _ = setup()
    loss_fn = losses.next_token(model)
    sgd = optim.sgd(1.0)
    step = train.make_step(loss_fn, sgd, clip_norm=0.05)
    new, metrics = step(train.init_state(params, sgd, random.key(0)), batch(0))
    leaves, spec = optree.tree_flatten(params)
    live = [x.clone().requires_grad_() for x in leaves]
    loss_fn(optree.tree_unflatten(spec, live), batch(0))[0].backward()
    norm = torch.nn.utils.clip_grad_norm_(live, 0.05)
    torch.testing.assert_close(metrics["grad_norm"], norm)
    expected = optree.tree_unflatten(spec, [x.detach() - x.grad for x in live])
    assert_trees_close(new.params, expected, rtol=1e-5, atol=1e-7)


def test_bf16_compute_keeps_float32_master_params():
    model, _, opt, state = setup()
    policy = train.Precision("float32", "bfloat16")
    step = train.make_step(losses.next_token(model), opt, precision=policy)
    new, metrics = step(state, batch(0))
    assert all(x.dtype == torch.float32 for x in optree.tree_leaves(new.params))
    full, _ = train.make_step(losses.next_token(model), opt)(state, batch(0))
    torch.testing.assert_close(metrics["loss"], full_loss(model, state), rtol=2e-2, atol=0)
    assert_trees_close(new.params, full.params, rtol=0, atol=2e-2)  # one lr=1e-2 Adam step
    with pytest.raises(ValueError, match="compute_dtype must be a floating dtype"):
        train.Precision(compute_dtype="int8")


def full_loss(model, state):
    return losses.next_token(model)(state.params, batch(0))[0]


def test_donated_step_equals_pure_step():
    model, params, _, _ = setup()
    for opt in (optim.adamw(1e-2, weight_decay=0.1), optim.sgd(1e-2, momentum=0.9)):
        pure = train.make_step(losses.next_token(model), opt)
        donating = train.make_step(losses.next_token(model), opt, donate=True)
        state = train.init_state(params, opt, random.key(1))
        expected, _ = run(pure, state, 3)
        copy = optree.tree_map(torch.clone, state)
        got, _ = run(donating, copy, 3)
        assert_trees_close(got.params, expected.params, rtol=1e-6, atol=1e-7)
        assert_trees_equal(state.params, params)  # the pure run left its input alone


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_remat_gives_the_same_gradients_with_dropout(compiled):
    cfg = dataclasses.replace(CFG, dropout=0.2)
    model, params, _, _ = setup(cfg)
    remat_model = fl.models.GPT(dataclasses.replace(cfg, remat=True))
    grad = train.value_and_grad(losses.next_token(model))
    grad_remat = train.value_and_grad(losses.next_token(remat_model))
    if compiled:
        grad_remat = train.compile(grad_remat)
    key = random.key(3)
    (loss, _), expected = grad(params, batch(0), key)
    (loss_r, _), got = grad_remat(params, batch(0), key)
    torch.testing.assert_close(loss_r, loss, rtol=1e-6, atol=1e-6)
    assert_trees_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # compiles a whole step (--full tier)
def test_users_compose_steps_ema_and_an_extra_loss_term():
    """Both are user code around the library's pieces, as a research script would write them."""
    model, params, opt, state = setup()
    base_loss = losses.next_token(model)

    def with_l2(params, batch, key, weight=1e-3):
        loss, aux = base_loss(params, batch, key)
        l2 = sum((w**2).sum() for w in fl.tree.select(params, "*.w").values())
        return loss + weight * l2, {**aux, "l2": l2.detach()}

    step = train.make_step(with_l2, opt)

    def with_ema(step, decay=0.9):
        def ema_step(carry, batch):
            state, ema = carry
            state, metrics = step(state, batch)
            ema = optree.tree_map(lambda e, p: decay * e + (1 - decay) * p, ema, state.params)
            return (state, ema), metrics

        return ema_step

    ema_step = train.compile(with_ema(step))
    (final, ema), metrics = ema_step((state, params), batch(0))
    (final, ema), metrics = ema_step((final, ema), batch(1))
    assert "l2" in metrics
    # EMA after two steps: 0.81 p0 + 0.09 p1 + 0.1 p2; recompute p1, p2 eagerly.
    s1, _ = step(state, batch(0))
    s2, _ = step(s1, batch(1))
    expected = optree.tree_map(
        lambda a, b, c: 0.81 * a + 0.09 * b + 0.1 * c, params, s1.params, s2.params
    )
    assert_trees_close(ema, expected, rtol=1e-4, atol=1e-6)
    # The extra term's gradient, 2 * 1e-3 * w, is exactly what it adds on each "*.w" leaf.
    _, with_term = train.value_and_grad(with_l2)(params, batch(0), None)
    _, without = train.value_and_grad(base_loss)(params, batch(0), None)
    added = fl.tree.map_with_path(
        lambda path, p, a, b: (a - b) - (2e-3 * p if fl.tree.matches(path, "*.w") else 0),
        params, with_term, without,
    )  # fmt: skip
    assert max(float(x.abs().max()) for x in optree.tree_leaves(added)) < 1e-6


def test_eval_step_and_evaluate_weight_by_counted_tokens():
    model, params, _, _ = setup()
    eval_step = train.make_eval_step(losses.next_token(model))
    batches = [batch(0, ignore_fraction=0.7), batch(1, ignore_fraction=0.0)]
    result = train.evaluate(eval_step, params, batches)
    inputs = torch.cat([b["inputs"] for b in batches])
    targets = torch.cat([b["targets"] for b in batches])
    whole, aux = losses.next_token(model)(params, {"inputs": inputs, "targets": targets})
    assert result["loss"] == pytest.approx(float(whole), rel=1e-5)
    assert result["count"] == float(aux["count"])


def test_func_gradient_path_vmaps_over_an_ensemble_and_steps_alike():
    model, params, opt, state = setup()
    members = [params, fl.models.GPT(CFG).init(random.key(9))]
    stacked = optree.tree_map(lambda *xs: torch.stack(xs), *members)
    loss_fn = losses.next_token(model)
    vg = train.value_and_grad(loss_fn, method="func")
    (losses_, _), grads = torch.func.vmap(vg, in_dims=(0, None, None))(stacked, batch(0), None)
    for i, member in enumerate(members):
        (loss, _), expected = train.value_and_grad(loss_fn)(member, batch(0), None)
        torch.testing.assert_close(losses_[i], loss, rtol=1e-5, atol=1e-6)
        assert_trees_close(
            optree.tree_map(lambda g, i=i: g[i], grads), expected, rtol=1e-4, atol=1e-6
        )
    func_step = train.make_step(loss_fn, opt, clip_norm=1.0, grad_method="func")
    auto_step = train.make_step(loss_fn, opt, clip_norm=1.0)
    a, _ = run(func_step, state, 3)
    b, _ = run(auto_step, state, 3)
    assert_trees_close(a.params, b.params, rtol=1e-4, atol=1e-5)
