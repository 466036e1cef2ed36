"""Pure layers: reference parity, attention properties, keyed dropout, axes and shape checks."""

import dataclasses
import math

import numpy as np
import optree
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import functional_llm as fl
from functional_llm import nn, random
from functional_llm.nn import taps

TOL = dict(atol=1e-5, rtol=1e-5)
seeds = st.integers(0, 2**32 - 1)


@given(seed=seeds, n_in=st.integers(1, 8), n_out=st.integers(1, 8), bias=st.booleans())
def test_linear_equals_torch(seed, n_in, n_out, bias):
    layer = nn.Linear(in_dims=n_in, out_dims=n_out, bias=bias)
    p = layer.init(random.key(seed))
    x = random.normal(random.key(seed + 1), (3, n_in))
    torch.testing.assert_close(layer.apply(p, x), F.linear(x, p["w"].T, p.get("b")), **TOL)


def test_multi_axis_linear_contracts_all_input_axes():
    layer = nn.Linear(
        in_dims=(2, 3), out_dims=(4, 5), in_axes=("heads", "head_dim"), out_axes=("a", "b")
    )
    p = layer.init(random.key(0))
    x = random.normal(random.key(1), (7, 2, 3))
    want = torch.einsum("nij,ijkl->nkl", x, p["w"]) + p["b"]
    torch.testing.assert_close(layer.apply(p, x), want, **TOL)


@given(seed=seeds, dim=st.integers(1, 16))
def test_norms_equal_torch(seed, dim):
    x = random.normal(random.key(seed), (2, 3, dim)) * 3 + 1
    ln = nn.LayerNorm(dim=dim)
    p = {
        "scale": random.normal(random.key(seed + 1), (dim,)),
        "bias": random.normal(random.key(seed + 2), (dim,)),
    }
    torch.testing.assert_close(
        ln.apply(p, x), F.layer_norm(x, (dim,), p["scale"], p["bias"], 1e-5), **TOL
    )
    ref = torch.nn.RMSNorm(dim, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(p["scale"])
    torch.testing.assert_close(nn.RMSNorm(dim=dim).apply({"scale": p["scale"]}, x), ref(x), **TOL)


def test_dropout_is_driven_by_the_key_only():
    x = torch.ones(10_000)
    assert nn.dropout(x, 0.0, key=None) is x
    with pytest.raises(ValueError, match="without a key"):
        nn.dropout(x, 0.3, key=None)
    k = random.key(0)
    a, b = nn.dropout(x, 0.3, key=k), nn.dropout(x, 0.3, key=k)
    assert torch.equal(a, b)
    assert not torch.equal(a, nn.dropout(x, 0.3, key=random.key(1)))
    kept = (a != 0).float().mean().item()
    assert abs(kept - 0.7) < 4 * math.sqrt(0.21 / 10_000)
    assert torch.equal(a[a != 0], torch.full_like(a[a != 0], 1 / 0.7))  # inverted scaling
    with pytest.raises(ValueError, match="rate"):
        nn.Dropout(rate=1.5)


@st.composite
def attention_settings(draw):
    n_kv = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([2, 4, 6]))
    return n_kv * groups, n_kv, head_dim


@given(seed=seeds, s=attention_settings(), causal=st.booleans())
def test_grouped_query_attention_equals_mha_with_repeated_kv_heads(seed, s, causal):
    n_heads, n_kv, hd = s
    d = n_heads * hd
    gqa = nn.MultiHeadAttention(d_model=d, n_heads=n_heads, n_kv_heads=n_kv)
    mha = nn.MultiHeadAttention(d_model=d, n_heads=n_heads)
    p = gqa.init(random.key(seed))
    g = n_heads // n_kv
    p_mha = {
        **p,
        **{
            n: {"w": p[n]["w"].repeat_interleave(g, 1), "b": p[n]["b"].repeat_interleave(g, 0)}
            for n in "kv"
        },
    }
    x = random.normal(random.key(seed + 1), (2, 5, d))
    torch.testing.assert_close(
        gqa.apply(p, x, causal=causal), mha.apply(p_mha, x, causal=causal), **TOL
    )


@given(seed=seeds, p=st.integers(0, 50), s=st.integers(0, 50), shift=st.integers(-20, 100))
def test_rope_scores_depend_on_relative_position_only(seed, p, s, shift):
    q, k = random.normal(random.key(seed), (2, 1, 1, 8)).unbind(0)
    pos = lambda i: torch.tensor([float(i)])  # noqa: E731
    score = lambda a, b: (nn.rope(q, pos(a)) * nn.rope(k, pos(b))).sum()  # noqa: E731
    torch.testing.assert_close(score(p, s), score(p + shift, s + shift), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(nn.rope(q, pos(0)), q)  # position 0 is the identity


def test_sinusoidal_matches_the_paper():
    d, positions = 6, torch.arange(5)
    got = nn.sinusoidal(positions, d).numpy()
    want = np.zeros((5, d))
    for pos in range(5):
        for i in range(d // 2):
            want[pos, 2 * i] = np.sin(pos / 10000 ** (2 * i / d))
            want[pos, 2 * i + 1] = np.cos(pos / 10000 ** (2 * i / d))
    np.testing.assert_allclose(got, want, atol=1e-6)


@given(seed=seeds, length=st.integers(2, 7), data=st.data())
def test_padded_keys_never_change_other_positions(seed, length, data):
    valid_len = data.draw(st.integers(1, length - 1))
    valid = torch.arange(length) < valid_len
    attn = nn.MultiHeadAttention(d_model=8, n_heads=2, rope_theta=10000.0)
    p = attn.init(random.key(seed))
    x = random.normal(random.key(seed + 1), (length, 8))
    edited = torch.where(valid[:, None], x, 100 * random.normal(random.key(seed + 2), (length, 8)))
    for causal in (False, True):
        a = attn.apply(p, x, mask=nn.key_padding_mask(valid), causal=causal)
        b = attn.apply(p, edited, mask=nn.key_padding_mask(valid), causal=causal)
        torch.testing.assert_close(a[valid], b[valid], **TOL)


@given(seed=seeds, causal=st.booleans())
def test_captured_weights_are_the_softmax_used(seed, causal):
    attn = nn.MultiHeadAttention(d_model=8, n_heads=2)
    p = attn.init(random.key(seed))
    x, mem = (
        random.normal(random.key(seed + 1), (2, 4, 8)),
        random.normal(random.key(seed + 2), (2, 6, 8)),
    )
    valid = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    y, acts = taps.capture(attn.apply, p, x, mem, mask=nn.key_padding_mask(valid))
    w = acts["weights"]
    assert w.shape == (2, 2, 4, 6) and acts["heads"].shape == (2, 4, 2, 4)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 4), **TOL)
    assert (w[1, ..., 3:] == 0).all()
    torch.testing.assert_close(y, attn.apply(p, x, mem, mask=nn.key_padding_mask(valid)), **TOL)
    _, acts = taps.capture(attn.apply, p, x, causal=causal)
    if causal:
        assert (acts["weights"].triu(1) == 0).all()


def test_attention_dropout_needs_a_key():
    attn = nn.MultiHeadAttention(d_model=8, n_heads=2, dropout=0.5)
    p = attn.init(random.key(0))
    x = random.normal(random.key(1), (3, 8))
    plain = nn.MultiHeadAttention(d_model=8, n_heads=2).apply(p, x)
    with pytest.raises(ValueError, match="without a key"):
        attn.apply(p, x)
    torch.testing.assert_close(nn.inference(attn).apply(p, x), plain)
    k = random.key(2)
    assert torch.equal(attn.apply(p, x, key=k), attn.apply(p, x, key=k))
    assert not torch.allclose(attn.apply(p, x, key=k), plain)


LAYERS = {
    "linear": nn.Linear(in_dims=4, out_dims=6),
    "embedding": nn.Embedding(num=11, dim=4),
    "layernorm": nn.LayerNorm(dim=4),
    "rmsnorm": nn.RMSNorm(dim=4),
    "mha": nn.MultiHeadAttention(d_model=8, n_heads=4, n_kv_heads=2, bias=False),
    "mlp": nn.MLP(d_model=4, d_ff=8, activation="swiglu"),
    "encoder_block": nn.Block(d_model=8, n_heads=2, d_ff=16, norm="rmsnorm"),
    "decoder_block": nn.DecoderBlock(d_model=8, n_heads=2, d_ff=16, kv_dim=6),
    "encoder_decoder": nn.EncoderDecoder(
        encoder=nn.Stack(block=nn.Block(d_model=8, n_heads=2, d_ff=16), n_layers=2),
        decoder=nn.Decoder(block=nn.DecoderBlock(d_model=8, n_heads=2, d_ff=16), n_layers=1),
    ),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_axes_name_every_dimension_of_every_param(name):
    layer = LAYERS[name]
    params = layer.init(random.key(0))
    shapes = optree.tree_map(lambda x, a: (x.ndim, len(a)), params, layer.axes())
    assert all(
        ndim == n_axes
        for ndim, n_axes in optree.tree_leaves(shapes, is_leaf=lambda t: isinstance(t, tuple))
    )
    meta = layer.shapes()
    assert all(m.device.type == "meta" for m in fl.tree.leaves(meta))
    assert [m.shape for m in fl.tree.leaves(meta)] == [x.shape for x in fl.tree.leaves(params)]


def test_check_names_the_path_and_both_shapes():
    layer = LAYERS["encoder_block"]
    params = layer.init(random.key(0))
    params["mlp"]["up"]["w"] = torch.zeros(8, 15)
    del params["attn_norm"]["scale"]
    with pytest.raises(ValueError) as err:
        layer.check(params)
    message = str(err.value)
    assert "params.mlp.up.w: expected shape (8, 16), got (8, 15)" in message
    assert "params.attn_norm.scale: missing (expected shape (8,))" in message


def test_layer_settings_are_validated():
    with pytest.raises(ValueError, match="n_kv_heads"):
        nn.MultiHeadAttention(d_model=8, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        nn.MultiHeadAttention(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="activation"):
        nn.MLP(d_model=4, d_ff=8, activation="tanh")
    with pytest.raises(ValueError, match="norm must be"):
        nn.Block(d_model=8, n_heads=2, d_ff=16, norm="batchnorm")
    with pytest.raises(TypeError, match="boolean"):
        nn.MultiHeadAttention(d_model=8, n_heads=2).apply(
            nn.MultiHeadAttention(d_model=8, n_heads=2).init(random.key(0)),
            torch.ones(3, 8),
            mask=torch.ones(3, 3),
        )


def test_shapes_are_fresh_values_that_callers_may_change():
    layer = LAYERS["encoder_block"]
    params = layer.init(random.key(0))
    mine = layer.shapes()
    del mine["attn_norm"]
    mine["mlp"]["up"]["w"] = torch.empty(1, device="meta")
    twin = dataclasses.replace(layer)  # equal, so it shares the cached description
    assert twin == layer
    twin.check(params)  # still the real shapes
    assert set(twin.shapes()) == set(params)
