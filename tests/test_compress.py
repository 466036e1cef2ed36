"""Compression: quantisation error within the format's bound, quantised apply = dequantised
float apply for every family, quantised params checkpoint and decode; bad requests refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functional_llm as fl
from functional_llm import compress, random
from tests.models_zoo import bert, gpt2, llama, transformer


def _weight(seed: int, out: int, k: int) -> dict:
    return {"blocks": [{"w": random.normal(random.key(seed), (k, out))}]}


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), out=st.sampled_from([16, 32, 48]), k=st.sampled_from([64, 128]),
       group=st.sampled_from([32, 64]), symmetric=st.booleans())  # fmt: skip
def test_int4_error_is_at_most_half_a_step_per_group(seed, out, k, group, symmetric) -> None:
    params = _weight(seed, out, k)
    q = compress.quantize(params, {"blocks": [{"w": ("embed", "mlp")}]}, bits=4,
                          group_size=group, symmetric=symmetric)  # fmt: skip
    packed = q["blocks"][0]["w"]
    assert isinstance(packed, compress.Int4Weight) and packed.group_size == group
    w = params["blocks"][0]["w"]  # (in, out); groups run along the inputs
    err = (compress.dequantize(q)["blocks"][0]["w"] - w).abs()
    steps = packed.scales_and_zeros[..., 0].T.repeat_interleave(group, dim=1).T  # (in, out)
    assert bool((err <= steps / 2 * (1 + 1e-5) + 1e-7).all())


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), out=st.integers(1, 40), k=st.integers(1, 40),
       symmetric=st.booleans())  # fmt: skip
def test_int8_error_is_at_most_half_a_step_per_channel(seed, out, k, symmetric) -> None:
    params = _weight(seed, out, k)
    q = compress.quantize(params, {"blocks": [{"w": ("embed", "mlp")}]}, symmetric=symmetric)
    packed = q["blocks"][0]["w"]
    err = (compress.dequantize(q)["blocks"][0]["w"] - params["blocks"][0]["w"]).abs()
    assert bool((err <= packed.scale / 2 * (1 + 1e-5) + 1e-7).all())  # scale: one per output


FAMILIES = {
    "gpt2": lambda: gpt2(d_model=32, n_heads=2),
    "llama": lambda: llama(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64),
    "bert": lambda: bert(d_model=32, n_heads=2, d_ff=64),
    "transformer": lambda: transformer(d_model=32, nhead=2, dim_feedforward=64),
}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_quantised_apply_equals_the_dequantised_float_apply(name: str, bits: int) -> None:
    model = fl.nn.inference(FAMILIES[name]())
    params = model.init(random.key(0))
    q = compress.quantize(params, model.axes(), bits=bits)
    x = random.randint(random.key(1), (2, 6), 0, 20)
    args = (x, x) if name == "transformer" else (x,)
    got, want = model.apply(q, *args), model.apply(compress.dequantize(q), *args)
    for a, b in zip(fl.tree.leaves(got), fl.tree.leaves(want), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_quantised_params_checkpoint_and_decode(tmp_path: Path) -> None:
    model = llama(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64)
    params = model.init(random.key(0))
    for bits in (8, 4):
        q = compress.quantize(params, model.axes(), bits=bits, symmetric=bits == 8)
        fl.checkpoint.save(tmp_path / f"q{bits}.safetensors", q)
        back = fl.checkpoint.load(tmp_path / f"q{bits}.safetensors", like=q)
        fl.testing.assert_trees_equal(back, q)
        prompt = random.randint(random.key(2), (2, 3), 0, 20)
        got = fl.generate.generate(model, back, prompt, max_new_tokens=6).tokens
        want = fl.generate.generate(model, compress.dequantize(q), prompt, max_new_tokens=6).tokens
        assert torch.equal(got, want)
        assert fl.tree.nbytes(q) < fl.tree.nbytes(params)


def test_bad_quantisation_requests_are_clear_errors() -> None:
    model = gpt2(d_model=32, n_heads=2)
    params, axes = model.init(random.key(0)), model.axes()
    with pytest.raises(
        ValueError, match=r"group_size 48 does not divide blocks.0.attn.k.w's input dim 32"
    ):
        compress.quantize(params, axes, bits=4, group_size=48)
    with pytest.raises(ValueError, match=r"'decoder\.\*' matches no path"):
        compress.quantize(params, axes, include=("decoder.*",))
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        compress.quantize(params, axes, bits=3)
    small = llama(d_model=8, n_heads=2)
    with pytest.raises(ValueError, match="multiple of 16 and input dim of 32"):
        compress.quantize(small.init(random.key(0)), small.axes(), bits=4)


# -- pruning -----------------------------------------------------------------------------------


def _mha(**kw):  # multi-head attention (heads prune independently), biases on
    return gpt2(d_model=32, n_heads=4, **kw)


def _zero_heads(params: dict, dropped: list[list[int]]) -> dict:
    """The params with the dropped heads' weights zeroed (the masked model)."""
    blocks = []
    for block, heads in zip(params["blocks"], dropped, strict=True):
        attn = {n: dict(v) for n, v in block["attn"].items()}
        for h in heads:
            for n in "qkv":
                attn[n]["w"] = attn[n]["w"].clone().index_fill_(1, torch.tensor([h]), 0.0)
                attn[n]["b"] = attn[n]["b"].clone().index_fill_(0, torch.tensor([h]), 0.0)
            attn["o"]["w"] = attn["o"]["w"].clone().index_fill_(0, torch.tensor([h]), 0.0)
        blocks.append({**block, "attn": attn})
    return {**params, "blocks": blocks}


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), keep=st.integers(1, 4))
def test_a_head_pruned_model_equals_the_masked_model(seed: int, keep: int) -> None:
    model = _mha()
    params = model.init(random.key(seed))
    scores = compress.head_importance(model, params)
    small, pruned = compress.prune_heads(model, params, keep)
    assert small.config.n_heads == keep and small.config.dim_per_head == 8
    kept = scores.topk(keep, dim=-1).indices
    dropped = [[h for h in range(4) if h not in row.tolist()] for row in kept]
    x = random.randint(random.key(seed + 1), (2, 7), 0, 20)
    torch.testing.assert_close(small.apply(pruned, x), model.apply(_zero_heads(params, dropped), x),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    assert fl.tree.size(pruned) < fl.tree.size(params) or keep == 4


def test_pruning_zero_importance_heads_leaves_the_logits_unchanged() -> None:
    model = _mha()
    params = _zero_heads(model.init(random.key(0)), [[1, 3], [0, 2]])
    small, pruned = compress.prune_heads(model, params, keep=2)
    assert compress.head_importance(model, params)[0, 1] == 0
    x = random.randint(random.key(1), (2, 9), 0, 20)
    torch.testing.assert_close(small.apply(pruned, x), model.apply(params, x), rtol=1e-5, atol=1e-6)
    narrow, fewer = compress.prune_neurons(model, params, keep=40)
    assert narrow.config.ffn_dim == 40 and fewer["blocks"][0]["mlp"]["up"]["w"].shape == (32, 40)


def test_magnitude_masks_stay_pruned_through_adamw() -> None:
    model = _mha()
    params = model.init(random.key(0))
    masks = compress.magnitude_masks(params, 0.5)
    q = masks["blocks"][0]["attn"]["q"]["w"]
    assert abs(q.float().mean().item() - 0.5) < 0.01
    assert bool(masks["embed"]["table"].all())  # not a target: kept whole
    opt = compress.keep_pruned(fl.optim.adamw(1e-2, weight_decay=0.1), masks)
    loss = fl.losses.next_token(model)
    state = fl.train.init_state(compress.apply_masks(params, masks), opt, random.key(1))
    step = fl.train.make_step(loss, opt)
    for s in range(3):
        tokens = random.randint(random.key(s), (2, 9), 0, 20)
        state, _ = step(state, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    w = state.params["blocks"][0]["attn"]["q"]["w"]
    assert bool((w[~q] == 0).all()) and bool((w[q] != 0).all())
    assert (
        compress.sparsity_at(0, 0.8, 10, 20) == 0.0 and compress.sparsity_at(20, 0.8, 10, 20) == 0.8
    )
    assert compress.sparsity_at(15, 0.8, 10, 20) == pytest.approx(0.8 * (1 - 0.5**3))


def test_bad_pruning_requests_are_clear_errors() -> None:
    model = _mha()
    params = model.init(random.key(0))
    with pytest.raises(ValueError, match=r"keep must be in \[1, 4\] \(the layer has 4\), got 5"):
        compress.prune_heads(model, params, keep=5)
    with pytest.raises(ValueError, match=r"keep must be in \[1, 128\]"):
        compress.prune_neurons(model, params, keep=0)
    with pytest.raises(ValueError, match="sparsity must be in"):
        compress.magnitude_masks(params, 1.0)
    with pytest.raises(ValueError, match="grouped-query attention"):
        gqa = llama(d_model=32, n_heads=4, n_kv_heads=2)
        compress.prune_heads(gqa, gqa.init(random.key(0)), keep=2)


# -- distillation ------------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), temperature=st.floats(0.5, 4.0))
def test_kl_equals_its_definition_and_its_gradient_finite_differences(seed, temperature) -> None:
    s = random.normal(random.key(seed), (3, 5, 7), dtype=torch.float64)
    t = random.normal(random.key(seed + 1), (3, 5, 7), dtype=torch.float64)
    p, q = torch.softmax(t / temperature, -1), torch.softmax(s / temperature, -1)
    want = temperature**2 * (p * (p.log() - q.log())).sum(-1).mean()
    got = compress.kl_divergence(s, t, temperature)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    fl.testing.check_gradients(lambda x: compress.kl_divergence(x["s"].double(), t, temperature),
                               {"s": s}, random.key(seed), atol=1e-7)  # fmt: skip
    # soft labels: cross-entropy against a distribution is -sum_c p_c log q_c
    ce, _ = fl.losses.cross_entropy(s, p)
    torch.testing.assert_close(
        ce, -(p * torch.log_softmax(s, -1)).sum(-1).mean(), rtol=1e-9, atol=0
    )


def test_distillation_gives_the_teacher_no_gradient() -> None:
    teacher, student = gpt2(d_model=32, n_heads=4), gpt2(d_model=16, n_heads=2, n_layers=1)
    t_params = teacher.init(random.key(0))
    t_leaves = [x.requires_grad_() for x in fl.tree.leaves(t_params)]
    loss_fn = compress.distill(
        lambda p, b, k: student.apply(p, b["inputs"], key=k),
        lambda p, b: teacher.apply(p, b["inputs"]),
        t_params, alpha=0.7, temperature=2.0,
    )  # fmt: skip
    tokens = random.randint(random.key(1), (2, 9), 0, 20)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    s_params = student.init(random.key(2))
    s_leaves = [x.requires_grad_() for x in fl.tree.leaves(s_params)]
    loss, aux = loss_fn(s_params, batch, None)
    grads = torch.autograd.grad(loss, t_leaves + s_leaves, allow_unused=True)
    assert all(g is None for g in grads[: len(t_leaves)])
    assert all(g is not None for g in grads[len(t_leaves) :])
    assert float(loss) == pytest.approx(0.7 * float(aux["kl"]) + 0.3 * float(aux["nll"]), rel=1e-5)


def test_int8_with_bf16_activations_is_close_to_the_float_apply() -> None:
    model = llama(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64)
    params = model.init(random.key(0))
    q = compress.quantize(params, model.axes(), bf16_activations=True)
    assert q["blocks"][0]["attn"]["q"]["w"].bf16_activations is True
    x = random.randint(random.key(1), (2, 6), 0, 20)
    want = model.apply(compress.dequantize(q), x)
    got = model.apply(q, x)
    assert got.dtype == torch.float32  # the layer's output keeps the activations' dtype
    torch.testing.assert_close(got, want, rtol=0, atol=3e-2 * float(want.abs().max()))
