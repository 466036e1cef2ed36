"""Explicit keys: known-answer vectors, determinism, independence, statistics, compile, vmap."""

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import vmap

import functional_llm.random as R

ALPHA = 1e-4  # fixed keys, so a statistical test gives the same verdict every run
N = 200_000


def as_key(a, b):
    return torch.tensor([a, b], dtype=torch.int64)


@pytest.mark.parametrize(
    "key, counter, expected",
    [  # Random123's known-answer vectors for Threefry-2x32-20
        ((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
        ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
        ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
    ],
)
def test_threefry_known_answers(key, counter, expected):
    x0, x1 = (torch.tensor([c], dtype=torch.int64) for c in counter)
    y0, y1 = R.threefry2x32(as_key(*key), x0, x1)
    assert (int(y0), int(y1)) == expected


def test_threefry_does_not_modify_its_arguments():
    k, x0, x1 = as_key(1, 2), torch.arange(4), torch.zeros(4, dtype=torch.int64)
    before = [t.clone() for t in (k, x0, x1)]
    R.threefry2x32(k, x0, x1)
    for t, b in zip((k, x0, x1), before, strict=True):
        assert torch.equal(t, b)


def test_long_draws_equal_one_cipher_call():
    """Eager draws are computed in chunks; the words are those of one call over all counters."""
    k = R.key(5)
    n = 2 * R._CHUNK + 7
    half = (n + 1) // 2
    counter = torch.arange(half)
    y0, y1 = R.threefry2x32(k, counter, torch.zeros_like(counter))
    assert torch.equal(R.bits(k, (n,)), torch.cat([y0, y1])[:n])
    keys = R.split(k, 2)  # and with a batch of keys
    assert torch.equal(R.bits(keys, (n,))[1], R.bits(keys[1], (n,)))


def test_scalar_draws():
    k = R.key(3)
    assert R.bits(k).shape == () and R.normal(k).shape == () and R.uniform(k, ()).shape == ()
    assert R.uniform(R.split(k, 4)).shape == (4,)


def test_key_from_seed_uses_all_64_bits():
    assert torch.equal(R.key(0), as_key(0, 0))
    assert torch.equal(R.key(2**40 + 7), as_key(2**8, 7))


DRAWS = {
    "bits": lambda k: R.bits(k, (7, 3)),
    "uniform": lambda k: R.uniform(k, (7, 3)),
    "uniform64": lambda k: R.uniform(k, (5,), torch.float64),
    "normal": lambda k: R.normal(k, (7, 3)),
    "truncated_normal": lambda k: R.truncated_normal(k, (9,)),
    "bernoulli": lambda k: R.bernoulli(k, 0.3, (20,)),
    "randint": lambda k: R.randint(k, (20,), -3, 1000),
    "categorical": lambda k: R.categorical(k, torch.zeros(20, 6)),
    "permutation": lambda k: R.permutation(k, 20),
    "gumbel": lambda k: R.gumbel(k, (8,)),
}


@given(seed=st.integers(0, 2**63 - 1), name=st.sampled_from(sorted(DRAWS)))
def test_same_key_same_values_different_keys_differ(seed, name):
    draw = DRAWS[name]
    k = R.key(seed)
    assert torch.equal(draw(k), draw(k.clone()))
    k1, k2 = R.split(k)
    assert not torch.equal(draw(k1), draw(k2)), "split keys gave the same draw"


@given(seed=st.integers(0, 2**63 - 1), n=st.integers(1, 6))
def test_split_and_fold_in_give_distinct_keys(seed, n):
    k = R.key(seed)
    keys = R.split(k, n)
    folded = torch.stack([R.fold_in(k, i) for i in range(n)])
    everything = torch.cat([keys, folded, k[None]])
    assert len({tuple(x.tolist()) for x in everything}) == 2 * n + 1
    assert torch.equal(R.fold_in(k, 3), R.fold_in(k, torch.tensor(3)))


@given(
    seed=st.integers(-(2**63), 2**64 - 1),
    num=st.integers(0, 80),
    data=st.integers(-(2**63), 2**63 - 1),
)
def test_host_key_derivations_are_the_cipher_on_tensors(seed, num, data):
    """A CPU key split or folded eagerly runs Threefry on Python ints (tensor dispatch would
    dominate); the words are the tensor cipher's, by its definition, and so is the layout."""
    k = R.key(seed)
    counter = torch.arange(num, dtype=torch.int64)
    words = R.threefry2x32(k, counter, torch.full_like(counter, 1))  # the split tag
    assert torch.equal(R.split(k, num), torch.stack(words, dim=-1))
    word = torch.tensor([data & 0xFFFFFFFF])
    assert torch.equal(
        R.fold_in(k, data), torch.cat(R.threefry2x32(k, word, torch.full_like(word, 2)))
    )
    assert torch.equal(R.fold_in(k, data), R.fold_in(k, torch.tensor(data)))  # the tensor path
    assert R.split(k, num).dtype == R.fold_in(k, data).dtype == torch.int64


@given(seed=st.integers(0, 2**63 - 1), n=st.integers(1, 5))
def test_vmap_over_keys_equals_a_loop(seed, n):
    keys = R.split(R.key(seed), n)
    for name in ("bits", "uniform", "normal", "bernoulli", "permutation"):
        batched = vmap(DRAWS[name])(keys)
        looped = torch.stack([DRAWS[name](k) for k in keys])
        assert torch.equal(batched, looped), name
    # A batch of keys given directly (leading dims) gives the same as vmap.
    assert torch.equal(R.uniform(keys, (7, 3)), vmap(DRAWS["uniform"])(keys))


@pytest.mark.slow  # compiles every draw (--full tier)
def test_compiled_draws_equal_eager():
    names = sorted(DRAWS)
    compiled = torch.compile(lambda k: [DRAWS[n](k) for n in names], fullgraph=True)
    k = R.key(1234)
    for name, got in zip(names, compiled(k), strict=True):
        want = DRAWS[name](k)
        if name in ("normal", "truncated_normal", "gumbel"):
            # Compiled erfinv/log kernels differ from ATen's by a few ulp (see module docs).
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
        else:
            assert torch.equal(got, want), name


def test_fold_in_of_a_step_tensor_compiles_once():
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    f = torch.compile(
        lambda k, step: R.uniform(R.fold_in(k, step), (3,)), backend=counter, fullgraph=True
    )
    outs = [f(R.key(0), torch.tensor(i)) for i in range(5)]
    assert counter.frame_count == 1
    assert len({tuple(o.tolist()) for o in outs}) == 5


def test_uniform_statistics():
    u = R.uniform(R.key(0), (N,)).double().numpy()
    assert u.min() >= 0.0 and u.max() < 1.0
    assert scipy.stats.kstest(u, "uniform").pvalue > ALPHA
    u64 = R.uniform(R.key(1), (N,), torch.float64, low=-2.0, high=3.0).numpy()
    assert scipy.stats.kstest(u64, "uniform", args=(-2.0, 5.0)).pvalue > ALPHA
    ub = R.uniform(R.key(2), (N,), torch.bfloat16)
    assert ub.max() < 1.0, "low-precision uniform must never round up to 1"


def test_normal_statistics():
    x = R.normal(R.key(3), (N,), mean=1.5, std=2.0).double().numpy()
    assert np.isfinite(x).all()
    assert scipy.stats.kstest(x, "norm", args=(1.5, 2.0)).pvalue > ALPHA


def test_truncated_normal_statistics():
    x = R.truncated_normal(R.key(4), (N,), lower=-1.0, upper=2.0, std=3.0).double().numpy()
    assert x.min() >= -3.0 and x.max() <= 6.0
    assert scipy.stats.kstest(x, "truncnorm", args=(-1.0, 2.0, 0.0, 3.0)).pvalue > ALPHA


def test_bernoulli_rate():
    p = 0.3
    hits = int(R.bernoulli(R.key(5), p, (N,)).sum())
    assert scipy.stats.binomtest(hits, N, p).pvalue > ALPHA


def test_randint_and_categorical_frequencies():
    x = R.randint(R.key(6), (N,), 10, 17)
    assert x.min() >= 10 and x.max() < 17
    counts = torch.bincount(x - 10, minlength=7).numpy()
    assert scipy.stats.chisquare(counts).pvalue > ALPHA
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    draws = R.categorical(R.key(7), probs.log().expand(N, 4))
    counts = torch.bincount(draws, minlength=4).numpy()
    expected = probs.double().numpy() / probs.double().sum().item() * N
    assert scipy.stats.chisquare(counts, expected).pvalue > ALPHA


def test_permutation_is_uniform():
    perms = vmap(lambda k: R.permutation(k, 5))(R.split(R.key(8), 20_000))
    assert torch.equal(perms.sort(-1).values, torch.arange(5).expand(20_000, 5))
    # Each value lands at each position with probability 1/5.
    table = torch.stack([torch.bincount(perms[:, i], minlength=5) for i in range(5)]).numpy()
    assert scipy.stats.chisquare(table.ravel()).pvalue > ALPHA


def test_split_streams_are_uncorrelated():
    keys = R.split(R.key(9), 8)
    u = R.uniform(keys, (N,)).double().numpy()
    corr = np.corrcoef(u)
    off_diag = corr[~np.eye(8, dtype=bool)]
    assert np.abs(off_diag).max() < 4.5 / np.sqrt(N)  # |r| of independent streams ~ N(0, 1/N)
    # Neighbouring folded keys (step t, t+1) are independent streams too.
    a, b = (R.uniform(R.fold_in(R.key(9), t), (N,)).double().numpy() for t in (0, 1))
    assert abs(np.corrcoef(a, b)[0, 1]) < 4.5 / np.sqrt(N)
    assert scipy.stats.ks_2samp(a, b).pvalue > ALPHA


def test_bad_keys_are_rejected():
    with pytest.raises(TypeError, match="expected a key"):
        R.uniform(torch.tensor([1.0, 2.0]), (3,))
    with pytest.raises(ValueError, match="randint"):
        R.randint(R.key(0), (3,), 5, 5)
