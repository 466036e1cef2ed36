"""Our layers equal torch.nn's with the same weights, in eval mode, within 1e-5 (fp32)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import functional_llm as fl
from functional_llm.interop import torch_nn as tnn
from functional_llm.nn import causal_mask, taps

TOL = dict(atol=1e-5, rtol=1e-5)


@st.composite
def dims(draw):
    n_heads = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    return n_heads * head_dim, n_heads


def lengths_mask(draw, batch, length):
    """A (B, S) key-padding mask (True = pad, torch's convention) keeping >= 1 real token."""
    lengths = draw(st.lists(st.integers(1, length), min_size=batch, max_size=batch))
    return torch.arange(length)[None, :] >= torch.tensor(lengths)[:, None]


def to_layout(x, batch_first):
    return x if batch_first else x.transpose(0, 1)


@given(
    data=st.data(), d=dims(), batch_first=st.booleans(), causal=st.booleans(), padded=st.booleans()
)
def test_multihead_attention(data, d, batch_first, causal, padded):
    d_model, n_heads = d
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    b, t = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6))
    mha = nn.MultiheadAttention(
        d_model, n_heads, batch_first=batch_first, bias=data.draw(st.booleans())
    ).eval()
    layer, params = tnn.from_multihead_attention(mha)
    x = torch.randn(b, t, d_model)
    pad = lengths_mask(data.draw, b, t) if padded else None
    attn_mask = ~causal_mask(t) if causal else None  # torch: True = forbidden
    xt = to_layout(x, batch_first)
    want, want_w = mha(
        xt, xt, xt, key_padding_mask=pad, attn_mask=attn_mask, average_attn_weights=False
    )
    mask = tnn.mask_from_torch(attn_mask, pad)
    got = layer.apply(params, x, mask=mask)
    got2, acts = taps.capture(layer.apply, params, x, mask=mask)
    got_w = acts["weights"]  # the explicit path's softmax, against torch's
    torch.testing.assert_close(got, to_layout(want, batch_first), **TOL)
    torch.testing.assert_close(got2, got, **TOL)
    torch.testing.assert_close(got_w, want_w, **TOL)


def test_mask_conversion():
    causal = torch.nn.Transformer.generate_square_subsequent_mask(
        3
    )  # float, -inf above the diagonal
    pad = torch.tensor([[False, False, True]])
    want = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    assert torch.equal(tnn.mask_from_torch(causal, pad)[0, 0], want)
    assert torch.equal(tnn.mask_from_torch(causal != 0), ~(causal != 0))
    with pytest.raises(ValueError, match="bias, not a mask"):
        tnn.mask_from_torch(torch.full((2, 2), 0.5))


@given(data=st.data(), d=dims())
def test_cross_attention_with_other_memory_width(data, d):
    d_model, n_heads = d
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    kdim = data.draw(st.integers(1, 12))
    mha = nn.MultiheadAttention(d_model, n_heads, kdim=kdim, vdim=kdim, batch_first=True).eval()
    layer, params = tnn.from_multihead_attention(mha)
    x, mem = torch.randn(2, 3, d_model), torch.randn(2, 5, kdim)
    torch.testing.assert_close(layer.apply(params, x, mem), mha(x, mem, mem)[0], **TOL)


@st.composite
def layer_settings(draw):
    d_model, n_heads = draw(dims())
    return dict(
        d_model=d_model,
        nhead=n_heads,
        dim_feedforward=draw(st.integers(1, 32)),
        activation=draw(st.sampled_from(["relu", "gelu"])),
        norm_first=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bias=draw(st.booleans()),
        layer_norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
    )


@given(data=st.data(), kw=layer_settings(), padded=st.booleans())
def test_encoder_layer(data, kw, padded):
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    module = nn.TransformerEncoderLayer(**kw).eval()
    block, params = tnn.from_encoder_layer(module)
    block = fl.nn.inference(block)  # the module is in eval mode
    b, t = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6))
    x = torch.randn(b, t, kw["d_model"])
    pad = lengths_mask(data.draw, b, t) if padded else None
    want = module(to_layout(x, kw["batch_first"]), src_key_padding_mask=pad)
    got = block.apply(params, x, mask=tnn.mask_from_torch(None, pad))
    torch.testing.assert_close(got, to_layout(want, kw["batch_first"]), **TOL)


@given(data=st.data(), kw=layer_settings(), padded=st.booleans())
def test_decoder_layer(data, kw, padded):
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    module = nn.TransformerDecoderLayer(**kw).eval()
    block, params = tnn.from_decoder_layer(module)
    block = fl.nn.inference(block)  # the module is in eval mode
    b, t, s = (
        data.draw(st.integers(1, 3)),
        data.draw(st.integers(1, 6)),
        data.draw(st.integers(1, 6)),
    )
    x, mem = torch.randn(b, t, kw["d_model"]), torch.randn(b, s, kw["d_model"])
    mem_pad = lengths_mask(data.draw, b, s) if padded else None
    bf = kw["batch_first"]
    want = module(
        to_layout(x, bf),
        to_layout(mem, bf),
        tgt_mask=~causal_mask(t),
        memory_key_padding_mask=mem_pad,
    )
    got = block.apply(params, x, mem, causal=True, memory_mask=tnn.mask_from_torch(None, mem_pad))
    torch.testing.assert_close(got, to_layout(want, bf), **TOL)


@given(data=st.data(), kw=layer_settings(), padded=st.booleans())
def test_full_transformer(data, kw, padded):
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    n_enc, n_dec = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    module = nn.Transformer(num_encoder_layers=n_enc, num_decoder_layers=n_dec, **kw).eval()
    model, params = tnn.from_transformer(module)
    model = fl.nn.inference(model)  # the module is in eval mode
    b, s, t = (
        data.draw(st.integers(1, 3)),
        data.draw(st.integers(1, 6)),
        data.draw(st.integers(1, 6)),
    )
    src, tgt = torch.randn(b, s, kw["d_model"]), torch.randn(b, t, kw["d_model"])
    src_pad = lengths_mask(data.draw, b, s) if padded else None
    tgt_pad = lengths_mask(data.draw, b, t) if padded else None
    bf = kw["batch_first"]
    want = module(
        to_layout(src, bf), to_layout(tgt, bf), tgt_mask=~causal_mask(t),
        src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad,
    )  # fmt: skip
    got = model.apply(
        params, src, tgt, src_mask=tnn.mask_from_torch(None, src_pad),
        tgt_mask=tnn.mask_from_torch(None, tgt_pad), memory_mask=tnn.mask_from_torch(None, src_pad),
        causal=True,
    )  # fmt: skip
    torch.testing.assert_close(got, to_layout(want, bf), **TOL)


@given(data=st.data(), kw=layer_settings())
def test_round_trip_to_torch(data, kw):
    """from_transformer(to_transformer(...)) gives back the same params; outputs agree."""
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    module = nn.Transformer(num_encoder_layers=2, num_decoder_layers=1, **kw).eval()
    model, params = tnn.from_transformer(module)
    again = tnn.to_transformer(model, params, batch_first=kw["batch_first"]).eval()
    model2, params2 = tnn.from_transformer(again)
    assert model2 == model
    torch.testing.assert_close(params2, params, atol=0, rtol=0)
    src, tgt = torch.randn(2, 4, kw["d_model"]), torch.randn(2, 3, kw["d_model"])
    bf = kw["batch_first"]
    torch.testing.assert_close(
        again(to_layout(src, bf), to_layout(tgt, bf)),
        module(to_layout(src, bf), to_layout(tgt, bf)),
        atol=0,
        rtol=0,
    )
