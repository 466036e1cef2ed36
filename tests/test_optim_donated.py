"""AdamW with donation: the same trajectory as the pure adamw; pure unless donating; with
donation the new state lives in the old buffers."""

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
def test_donated_adamw_follows_adamw(seed, s, donate, wd, masked):
    params, grad = problem(seed, s)
    schedule = optim.warmup_cosine(1e-2, 3, 10)
    # nanoGPT's rule: decay tensors with 2+ axes only (a callable mask, resolved once).
    mask = (lambda p: fl.tree.map(lambda x: x.ndim >= 2, p)) if masked else None
    ref, fast = (
        optim.adamw(schedule, weight_decay=wd, mask=mask),
        optim.adamw_donated(schedule, weight_decay=wd, mask=mask),
    )
    p_ref, s_ref = params, ref.init(params)
    p_fast = fl.tree.map(torch.clone, params)
    s_fast = fast.init(p_fast)
    for _ in range(10):
        u, s_ref = ref.update(grad(p_ref), s_ref, p_ref)
        p_ref = optim.apply_updates(p_ref, u)
        p_fast, s_fast = fast.step(p_fast, grad(p_fast), s_fast, donate=donate)
    for a, b in zip(fl.tree.leaves(p_fast), fl.tree.leaves(p_ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert float(s_fast.count) == 10


def test_without_donation_inputs_are_untouched():
    params, grad = problem(0, [(3, 4), (2,)])
    opt = optim.adamw_donated(0.1)
    state = opt.init(params)
    before = fl.tree.map(torch.clone, (params, state))
    new_params, _ = opt.step(params, grad(params), state)
    for a, b in zip(fl.tree.leaves((params, state)), fl.tree.leaves(before), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(new_params["p0"], params["p0"])


def test_donation_reuses_the_buffers():
    params, grad = problem(1, [(3, 4), (2,)])
    opt = optim.adamw_donated(0.1)
    state = opt.init(params)
    pointers = [x.data_ptr() for x in fl.tree.leaves((params, state))]
    new_params, new_state = opt.step(params, grad(params), state, donate=True)
    assert [x.data_ptr() for x in fl.tree.leaves((new_params, new_state))] == pointers


def test_donated_adamw_matches_torch_fused():
    params, grad = problem(2, [(5, 3)])
    ref = [torch.nn.Parameter(params["p0"].clone())]
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, fused=True)
    opt = optim.adamw_donated(1e-2, weight_decay=0.1)
    p, s = fl.tree.map(torch.clone, params), opt.init(params)
    for _ in range(5):
        ref[0].grad = grad({"p0": ref[0].detach()})["p0"]
        torch_opt.step()
        p, s = opt.step(p, grad(p), s, donate=True)
    torch.testing.assert_close(p["p0"], ref[0].detach(), rtol=0, atol=0)
