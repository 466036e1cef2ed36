"""One optimizer protocol: ``update_and_apply`` takes an optimizer's in-place path when the
caller donates, and on copies it owns when the caller does not. AdamW's (the fused kernel)
follows its pure trajectory, keeps the state's structure, writes into the donated buffers, and
leaves everything untouched without donation."""

import torch
from hypothesis import given
from hypothesis import strategies as st

import functional_llm as fl
from functional_llm import optim, random

shapes = st.lists(
    st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple), min_size=1, max_size=3
)


def problem(seed, shape_list):
    keys = random.split(random.key(seed), 2 * len(shape_list))
    params = {f"p{i}": random.normal(keys[2 * i], s) for i, s in enumerate(shape_list)}
    target = {f"p{i}": random.normal(keys[2 * i + 1], s) for i, s in enumerate(shape_list)}
    return params, lambda p: fl.tree.map(lambda x, t: 2.0 * (x - t), p, target)


@given(
    seed=st.integers(0, 2**31),
    s=shapes,
    donate=st.booleans(),
    wd=st.sampled_from([0.0, 0.1]),
    masked=st.booleans(),
)
def test_in_place_adamw_follows_adamw(seed, s, donate, wd, masked):
    params, grad = problem(seed, s)
    schedule = optim.warmup_cosine(1e-2, 3, 10)
    # nanoGPT's rule: decay tensors with 2+ axes only (a callable mask, resolved once).
    mask = (lambda p: fl.tree.map(lambda x: x.ndim >= 2, p)) if masked else None
    opt = optim.adamw(schedule, weight_decay=wd, mask=mask)
    p_ref, s_ref = params, opt.init(params)
    p_fast = fl.tree.map(torch.clone, params)
    s_fast = opt.init(p_fast)
    for _ in range(10):
        u, s_ref = opt.update(grad(p_ref), s_ref, p_ref)
        p_ref = optim.apply_updates(p_ref, u)
        p_fast, s_fast = optim.update_and_apply(opt, p_fast, grad(p_fast), s_fast, donate=donate)
    fl.testing.assert_trees_close(p_fast, p_ref, rtol=1e-6, atol=1e-6)
    fl.testing.assert_trees_close(s_fast, s_ref, rtol=1e-6, atol=1e-6)  # same structure too
    assert int(s_fast[0].count) == 10


def test_without_donation_inputs_are_untouched():
    params, grad = problem(0, [(3, 4), (2,)])
    opt = optim.adamw(0.1)
    state = opt.init(params)
    before = fl.tree.map(torch.clone, (params, state))
    new_params, _ = optim.update_and_apply(opt, params, grad(params), state)
    for a, b in zip(fl.tree.leaves((params, state)), fl.tree.leaves(before), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(new_params["p0"], params["p0"])


@given(
    seed=st.integers(0, 2**31),
    s=shapes,
    wd=st.sampled_from([0.0, 0.1]),
    masked=st.booleans(),
    injected=st.booleans(),
)
def test_the_pure_step_is_the_donated_step_bit_for_bit(seed, s, wd, masked, injected):
    """Without donation the fused kernel runs on copies the step owns: the same bits as the
    donated step, step after step, and the caller's params and state untouched."""
    params, grad = problem(seed, s)
    mask = (lambda p: fl.tree.map(lambda x: x.ndim >= 2, p)) if masked else None
    schedule = optim.warmup_cosine(1e-2, 2, 6)
    if injected:
        opt = optim.inject_hyperparams(optim.adamw)(learning_rate=1e-2, weight_decay=wd)
    else:
        opt = optim.adamw(schedule, weight_decay=wd, mask=mask)
    p_pure, s_pure = params, opt.init(params)
    p_don, s_don = fl.tree.map(torch.clone, (p_pure, s_pure))
    for _ in range(4):
        kept = fl.tree.map(torch.clone, (p_pure, s_pure))
        p_next, s_next = optim.update_and_apply(opt, p_pure, grad(p_pure), s_pure)
        for a, b in zip(fl.tree.leaves((p_pure, s_pure)), fl.tree.leaves(kept), strict=True):
            assert torch.equal(a, b)  # pure: nothing the caller holds was written
        p_pure, s_pure = p_next, s_next
        p_don, s_don = optim.update_and_apply(opt, p_don, grad(p_don), s_don, donate=True)
        for a, b in zip(fl.tree.leaves((p_pure, s_pure)), fl.tree.leaves((p_don, s_don)),
                        strict=True):  # fmt: skip
            assert torch.equal(a, b)


def test_the_pure_step_takes_the_chain_where_no_kernel_may_write():
    """Under vmap (an ensemble of optimizers) and on params that require grad, the pure step
    runs the chain of ``update`` and ``apply_updates``: the same values as the chain's."""
    params, grad = problem(5, [(3, 4), (2,)])
    opt = optim.adamw(1e-2, weight_decay=0.1)
    stacked = fl.tree.map(lambda x: torch.stack([x, 2 * x]), params)

    def chain_step(p, s):
        u, s = opt.update(grad(p), s, p)
        return optim.apply_updates(p, u), s

    def pure_step(p, s):
        return optim.update_and_apply(opt, p, grad(p), s)

    states = torch.func.vmap(opt.init)(stacked)
    got = torch.func.vmap(pure_step)(stacked, states)
    expected = torch.func.vmap(chain_step)(stacked, states)
    fl.testing.assert_trees_close(got, expected, rtol=0, atol=0)
    tracked = fl.tree.map(lambda x: x.clone().requires_grad_(), params)
    got = pure_step(tracked, opt.init(params))
    fl.testing.assert_trees_close(got, chain_step(tracked, opt.init(params)), rtol=0, atol=0)
    assert got[0]["p0"].requires_grad  # the chain's autograd graph, not a kernel's write
    # and a meta-gradient flows back through the step (no in-place write breaks the graph)
    meta = torch.autograd.grad(sum(x.sum() for x in fl.tree.leaves(got[0])), [tracked["p0"]])
    assert torch.isfinite(meta[0]).all() and meta[0].abs().sum() > 0


def test_donation_reuses_the_buffers():
    params, grad = problem(1, [(3, 4), (2,)])
    opt = optim.adamw(optim.warmup_cosine(0.1, 2, 5))
    state = opt.init(params)
    pointers = [x.data_ptr() for x in fl.tree.leaves((params, state))]
    new_params, new_state = optim.update_and_apply(opt, params, grad(params), state, donate=True)
    assert [x.data_ptr() for x in fl.tree.leaves((new_params, new_state))] == pointers


@given(injected=st.booleans())
def test_in_place_adamw_matches_torch_fused_bit_for_bit(injected):
    params, grad = problem(2, [(5, 3)])
    ref = [torch.nn.Parameter(params["p0"].clone())]
    # Injected hyperparams are float32 tensors: torch gets the same float32-rounded values.
    f32 = (lambda x: float(torch.tensor(x))) if injected else (lambda x: x)
    torch_opt = torch.optim.AdamW(
        ref,
        lr=torch.tensor(1e-2) if injected else 1e-2,
        betas=(f32(0.9), f32(0.999)),
        eps=f32(1e-8),
        weight_decay=f32(0.1),
        fused=True,
    )
    make = optim.inject_hyperparams(optim.adamw) if injected else optim.adamw
    opt = make(1e-2, weight_decay=0.1)  # injected: hyperparams are tensors in the state
    p, s = fl.tree.map(torch.clone, params), opt.init(params)
    for _ in range(5):
        ref[0].grad = grad({"p0": ref[0].detach()})["p0"]
        torch_opt.step()
        p, s = optim.update_and_apply(opt, p, grad(p), s, donate=True)
    torch.testing.assert_close(p["p0"], ref[0].detach(), rtol=0, atol=0)


def test_an_optimizer_without_an_in_place_path_adds_into_the_donated_params():
    params, grad = problem(3, [(4,)])
    opt = optim.sgd(0.1, momentum=0.9)
    assert opt.update_in_place is None
    pointer = params["p0"].data_ptr()
    expected, _ = optim.update_and_apply(opt, params, grad(params), opt.init(params))
    got, _ = optim.update_and_apply(opt, params, grad(params), opt.init(params), donate=True)
    assert got["p0"].data_ptr() == pointer
    torch.testing.assert_close(got["p0"], expected["p0"], rtol=0, atol=0)


def chained_adamw(lr, wd, mask):
    """AdamW as the plain chain of its transforms: the definition the fast pure update keeps."""
    decay = optim.add_decayed_weights(wd, mask) if wd != 0 else optim.identity()
    return optim.chain(optim.scale_by_adam(), decay, optim.scale_by_learning_rate(lr))


@given(
    seed=st.integers(0, 2**31),
    s=shapes,
    lr=st.sampled_from(["float", "tensor", "schedule"]),
    wd=st.sampled_from([0.0, 0.1, "tensor"]),
    masked=st.sampled_from([None, "fn", "tree"]),
)
def test_pure_adamw_update_is_its_chain_bit_for_bit(seed, s, lr, wd, masked):
    """AdamW's pure ``update`` writes the decay and the learning rate into its own direction
    instead of allocating; the updates and states equal the chain's exactly, and the caller's
    grads, params and state are left as they were."""
    params, grad = problem(seed, s)
    rate = {
        "float": 1e-2,
        "tensor": torch.tensor(1e-2),
        "schedule": optim.warmup_cosine(1e-2, 2, 6),
    }
    decay = torch.tensor(0.1) if wd == "tensor" else wd
    mask = {
        None: None,
        "fn": lambda p: fl.tree.map(lambda x: x.ndim >= 2, p),
        "tree": {name: i % 2 == 0 for i, name in enumerate(params)},
    }[masked]
    fast, reference = (
        optim.adamw(rate[lr], weight_decay=decay, mask=mask),
        chained_adamw(rate[lr], decay, mask),
    )
    s_fast, s_ref = fast.init(params), reference.init(params)
    for _ in range(4):
        g = grad(params)
        kept = fl.tree.map(torch.clone, (g, params, s_fast))
        u_fast, s_fast = fast.update(g, s_fast, params)
        u_ref, s_ref = reference.update(g, s_ref, params)
        fl.testing.assert_trees_close(u_fast, u_ref, rtol=0, atol=0)
        fl.testing.assert_trees_close(s_fast, s_ref, rtol=0, atol=0)
        fl.testing.assert_trees_close((g, params, kept[2]), kept, rtol=0, atol=0)
        params = optim.apply_updates(params, u_fast)
