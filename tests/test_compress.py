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
