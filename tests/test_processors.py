"""Each logits processor against its definition, over drawn logits and token histories."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from functional_llm.generate import processors as P

finite = st.floats(-20, 20, allow_nan=False, width=32)


@st.composite
def logits(draw, max_vocab=12):
    batch, vocab = draw(st.integers(1, 3)), draw(st.integers(2, max_vocab))
    values = draw(st.lists(finite, min_size=batch * vocab, max_size=batch * vocab))
    return torch.tensor(values).reshape(batch, vocab)


@st.composite
def histories(draw, batch, vocab):
    length = draw(st.integers(1, 10))
    ids = st.lists(st.integers(0, vocab - 1), min_size=batch * length, max_size=batch * length)
    tokens = torch.tensor(draw(ids)).reshape(batch, length)
    pads = draw(st.lists(st.integers(0, length - 1), min_size=batch, max_size=batch))
    valid = torch.arange(length)[None, :] >= torch.tensor(pads)[:, None]
    return P.Context(tokens, valid, draw(st.integers(0, 5)))


def kept(out):
    return torch.isfinite(out)


NONE = P.Context(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.bool), 0)


@settings(max_examples=200)
@given(z=logits(), p=st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_most_likely_set_that_reaches_p(z, p):
    out = P.top_p(p)(z, NONE)
    probs = z.softmax(-1)
    for row, keep in zip(probs, kept(out), strict=True):
        mass = float(row[keep].sum())
        assert mass >= p - 1e-6  # reaches p
        assert mass - float(row[keep].min()) < p + 1e-6  # no smaller prefix does
        if (~keep).any():
            assert float(row[keep].min()) >= float(row[~keep].max()) - 1e-7  # the most likely
    assert torch.equal(out[kept(out)], z[kept(out)])  # kept logits unchanged


@settings(max_examples=100)
@given(z=logits(), k=st.integers(1, 14))
def test_top_k_keeps_the_k_largest(z, k):
    out = P.top_k(k)(z, NONE)
    for row, keep in zip(z, kept(out), strict=True):
        kth = row.sort(descending=True).values[min(k, len(row)) - 1]
        assert torch.equal(keep, row >= kth)


@settings(max_examples=100)
@given(z=logits(), p=st.floats(0.01, 1.0))
def test_min_p_keeps_tokens_at_least_p_times_the_most_likely(z, p):
    out = P.min_p(p)(z, NONE)
    probs = z.softmax(-1)
    assert torch.equal(kept(out), probs >= p * probs.amax(-1, keepdim=True))
    assert kept(out).any(-1).all()


@settings(max_examples=100)
@given(data=st.data(), r=st.floats(0.5, 3.0))
def test_repetition_penalty_follows_its_definition(data, r):
    z = data.draw(logits())
    context = data.draw(histories(z.shape[0], z.shape[1]))
    out = P.repetition_penalty(r)(z, context)
    for b in range(z.shape[0]):
        seen = set(context.tokens[b][context.valid[b]].tolist())
        for v in range(z.shape[1]):
            x = float(z[b, v])
            want = (x / r if x > 0 else x * r) if v in seen else x
            assert math.isclose(float(out[b, v]), want, rel_tol=1e-6, abs_tol=1e-6)


@settings(max_examples=150)
@given(data=st.data(), n=st.integers(1, 4))
def test_no_repeat_ngram_bans_exactly_the_tokens_that_repeat_an_ngram(data, n):
    vocab = data.draw(st.integers(2, 5))
    z = torch.zeros(2, vocab)
    context = data.draw(histories(2, vocab))
    out = P.no_repeat_ngram(n)(z, context)
    for b in range(2):
        seq = context.tokens[b][context.valid[b]].tolist()
        grams = {tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)}
        for v in range(vocab):
            repeats = len(seq) + 1 >= n and tuple([*seq, v][len(seq) + 1 - n :]) in grams
            assert bool(torch.isinf(out[b, v])) == repeats, (seq, v)


def test_bad_words_forced_tokens_and_min_length():
    z = torch.zeros(1, 6)
    context = P.Context(torch.tensor([[0, 4, 1, 2]]), torch.tensor([[False, True, True, True]]), 2)
    out = P.bad_words([[3], [1, 2, 5], [4, 2, 0]])(z, context)
    assert torch.isinf(out[0]).tolist() == [False, False, False, True, False, True]
    assert torch.isfinite(P.forced_bos(4)(z, context._replace(generated=0))).tolist() == [
        [False, False, False, False, True, False]
    ]
    assert torch.equal(P.forced_bos(4)(z, context), z)  # not the first new token: unchanged
    last = P.forced_eos(5, max_new_tokens=3)(z, context)
    assert torch.isfinite(last)[0].tolist() == [False] * 5 + [True]
    held = P.min_length(4, [0, 5])(z, context)
    assert torch.isinf(held)[0].tolist() == [True, False, False, False, False, True]
    assert torch.equal(P.min_length(2, 0)(z, context), z)
    chained = P.chain(P.temperature(2.0), P.top_k(1))(torch.tensor([[1.0, 3.0]]), context)
    assert chained.tolist() == [[float("-inf"), 1.5]]


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: P.top_p(0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (lambda: P.top_p(1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (lambda: P.top_k(0), "top_k must be >= 1, got 0"),
        (lambda: P.min_p(0), r"min_p must be in \(0, 1\]"),
        (lambda: P.temperature(0), "temperature must be > 0"),
        (lambda: P.repetition_penalty(0), "repetition_penalty must be > 0"),
        (lambda: P.no_repeat_ngram(0), "no_repeat_ngram must be >= 1"),
        (lambda: P.bad_words([[]]), "at least one token"),
    ],
)
def test_bad_processor_arguments_are_named(make, named):
    with pytest.raises(ValueError, match=named):
        make()
