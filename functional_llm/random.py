"""Explicit, splittable random keys, as in JAX: no global RNG state anywhere.

A key is an ``int64`` tensor of shape ``(..., 2)`` holding two 32-bit words. Every draw is a
pure function of its key, computed with the counter-based Threefry-2x32 block cipher
(Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011; 20 rounds, the
variant JAX uses). Threefry needs only 32-bit add, rotate and xor, which we do in ``int32``
(whose addition wraps modulo 2^32) and hand out as ``int64`` words, so draws are
bit-identical eagerly, under ``torch.compile`` and under ``torch.func.vmap`` (a batch of
keys gives independent draws), on any device.

Deriving one CPU key eagerly (:func:`split` into at most 64 keys, :func:`fold_in` of an int)
runs the same cipher on Python ints: 20 µs instead of the 500 µs that dispatching its two
hundred tiny tensor operations costs.

Under ``torch.compile`` the integer work (keys, ``bits``, ``randint``, ``bernoulli``,
``permutation``) and ``uniform`` are bit-identical to eager. Distributions that go through a
transcendental function (``normal``: erfinv, ``gumbel``: log) agree to float rounding: the
compiled kernels for erfinv and log differ from ATen's by a few ulp (measured: erfinv up to
1.7e-6 absolute on float32 in the tails).

Rules of use, as in JAX: never draw twice from one key; :func:`split` it (or
:func:`fold_in` a step number) and use each new key once.

Distributions map 32-bit words to values:

* ``uniform``: ``u = (bits >> 8) * 2^-24`` in ``[0, 1)`` (53 bits from two words for float64),
  scaled to ``[low, high)``;
* ``normal``: the inverse CDF, ``sqrt(2) * erfinv(2u - 1)`` with ``u`` in the open ``(0, 1)``;
* ``truncated_normal``: the inverse CDF on ``u`` uniform in ``(Phi(lower), Phi(upper))``;
* ``categorical``: the Gumbel-max trick, ``argmax(logits - log(-log u))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "bernoulli",
    "bits",
    "categorical",
    "fold_in",
    "gumbel",
    "key",
    "normal",
    "permutation",
    "randint",
    "split",
    "truncated_normal",
    "uniform",
]

_MASK = 0xFFFFFFFF
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA
# Domain tags for the second counter word, so drawing, splitting and folding in never feed
# the cipher the same block.
_DRAW, _SPLIT, _FOLD = 0, 1, 2
_HOST_BLOCKS = 64  # up to this many blocks, a CPU key derivation runs on Python ints

Shape = Sequence[int] | torch.Size


def threefry2x32(
    key: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Threefry-2x32 with 20 rounds: encrypt counter words ``(x0, x1)`` under ``key``.

    ``key`` has shape ``(..., 2)``; its leading dimensions broadcast against the counters'.
    Each round is ``x0 += x1; x1 = rotl(x1, r) ^ x0`` on 32-bit words, with the key schedule
    injected every four rounds. The words are updated in place, but only the fresh tensors
    made by the first addition: the arguments are never modified (in-place updates beat a
    new tensor per operation on CPU). Words go in and come out as ``int64`` in ``[0, 2^32)``.
    """
    k0, k1 = key[..., 0:1], key[..., 1:2]
    if key.is_meta:  # shapes only (eval_shape): skip the 200 cipher operations
        out = torch.empty(
            torch.broadcast_shapes(k0.shape, x0.shape, x1.shape), dtype=torch.int64, device="meta"
        )
        return out, out
    # The rounds run on int32, whose addition wraps modulo 2^32 as Threefry's does: half the
    # bytes of int64 and no masking after each addition.
    ks = [w.to(torch.int32) for w in (k0, k1, k0 ^ k1 ^ _PARITY)]
    x0 = x0.to(torch.int32) + ks[0]
    x1 = x1.to(torch.int32) + ks[1]
    for block in range(5):
        for r in _ROTATIONS[block % 2]:
            x0.add_(x1)
            # rotl(x1, r): int32's >> copies the sign bit, so mask the bits it shifted in
            high = (x1 >> (32 - r)).bitwise_and_((1 << r) - 1)
            x1.bitwise_left_shift_(r).bitwise_or_(high).bitwise_xor_(x0)
        x0.add_(ks[(block + 1) % 3])
        x1.add_(ks[(block + 2) % 3] + (block + 1))
    return x0.to(torch.int64).bitwise_and_(_MASK), x1.to(torch.int64).bitwise_and_(_MASK)


def _threefry_ints(key: tuple[int, int], x0: int, x1: int) -> tuple[int, int]:
    """:func:`threefry2x32` on one block of Python ints: the same words, without the two
    hundred tensor operations whose dispatch dominates a key derivation on tiny tensors."""
    k0, k1 = key
    ks = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0, x1 = (x0 + k0) & _MASK, (x1 + k1) & _MASK
    for block in range(5):
        for r in _ROTATIONS[block % 2]:
            x0 = (x0 + x1) & _MASK
            x1 = (((x1 << r) | (x1 >> (32 - r))) & _MASK) ^ x0
        x0 = (x0 + ks[(block + 1) % 3]) & _MASK
        x1 = (x1 + ks[(block + 2) % 3] + block + 1) & _MASK
    return x0, x1


def _host_key(k: torch.Tensor) -> tuple[int, int] | None:
    """``k``'s words as ints when one key on the CPU is used eagerly (no compile, no vmap, no
    autograd): the case where Python arithmetic beats tensor dispatch. Otherwise None."""
    if (
        k.shape != (2,)
        or k.device.type != "cpu"
        or type(k) is not torch.Tensor
        or torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
    ):
        return None
    k0, k1 = k.tolist()
    return k0 & _MASK, k1 & _MASK


_CHUNK = 1 << 17  # counters per cipher call in eager mode: the working set stays in cache


def _encrypt_counters(
    k: torch.Tensor, counter: torch.Tensor, tag: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Threefry over ``(counter, tag)`` blocks. Eagerly, long counters go through in chunks
    (faster on CPU: the 200 passes over the words hit cache, not memory); the result is
    the same elementwise cipher either way."""
    if counter.shape[-1] <= _CHUNK or k.is_meta or torch.compiler.is_compiling():
        return threefry2x32(k, counter, torch.full_like(counter, tag))
    parts = [threefry2x32(k, c, torch.full_like(c, tag)) for c in counter.split(_CHUNK, dim=-1)]
    return torch.cat([p[0] for p in parts], dim=-1), torch.cat([p[1] for p in parts], dim=-1)


def key(seed: int | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """A new key from an integer seed in ``[-2^63, 2^64)`` (a negative seed is its 64-bit two's
    complement: ``key(-1) == key(2**64 - 1)``), or an int64 tensor of seeds; the key's device
    is where draws land. Floats and bools are refused, not truncated."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64:
            raise TypeError(f"random.key: a tensor seed must be int64, got {seed.dtype}")
        seeds = seed.to(device)
    elif isinstance(seed, int) and not isinstance(seed, bool):
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"random.key: the seed {seed} is outside [-2**63, 2**64)")
        signed = seed - 2**64 if seed >= 2**63 else seed  # the same 64 bits, as an int64
        seeds = torch.tensor(signed, dtype=torch.int64, device=device)
    else:
        raise TypeError(f"random.key: the seed must be an int, got {type(seed).__name__} {seed!r}")
    return torch.stack([(seeds >> 32) & _MASK, seeds & _MASK], dim=-1)


def _check_key(k: torch.Tensor) -> None:
    if not isinstance(k, torch.Tensor) or k.dtype != torch.int64 or k.shape[-1:] != (2,):
        got = f"{k.dtype} tensor of shape {tuple(k.shape)}" if isinstance(k, torch.Tensor) else k
        raise TypeError(f"expected a key (int64 tensor of shape (..., 2)), got {got}")


def split(k: torch.Tensor, num: int = 2) -> torch.Tensor:
    """``num`` new independent keys, shape ``(..., num, 2)``; unpack them like a tuple."""
    _check_key(k)
    host = _host_key(k) if num <= _HOST_BLOCKS else None
    if host is not None:
        words = [_threefry_ints(host, i, _SPLIT) for i in range(num)]
        return torch.tensor(words, dtype=torch.int64).reshape(num, 2)
    counter = torch.arange(num, dtype=torch.int64, device=k.device)
    y0, y1 = threefry2x32(k, counter, torch.full_like(counter, _SPLIT))
    return torch.stack([y0, y1], dim=-1)


def fold_in(k: torch.Tensor, data: int | torch.Tensor) -> torch.Tensor:
    """A new key from ``k`` and an integer (e.g. the step, as a tensor: no recompiles)."""
    _check_key(k)
    if isinstance(data, int) and not isinstance(data, bool) and -(2**63) <= data < 2**63:
        host = _host_key(k)
        if host is not None:
            return torch.tensor(_threefry_ints(host, data & _MASK, _FOLD), dtype=torch.int64)
    data = torch.as_tensor(data, dtype=torch.int64, device=k.device).reshape(1) & _MASK
    y0, y1 = threefry2x32(k, data, torch.full_like(data, _FOLD))
    return torch.cat([y0, y1], dim=-1)


def bits(k: torch.Tensor, shape: Shape = ()) -> torch.Tensor:
    """Uniform 32-bit words (as ``int64`` in ``[0, 2^32)``) of the given shape."""
    _check_key(k)
    shape = tuple(shape)
    n = math.prod(shape)
    half = (n + 1) // 2
    y0, y1 = _encrypt_counters(k, torch.arange(half, dtype=torch.int64, device=k.device), _DRAW)
    words = torch.cat([y0, y1], dim=-1)[..., :n]
    return words.reshape((*k.shape[:-1], *shape))


def _grid(k: torch.Tensor, shape: Shape, dtype: torch.dtype, m: int) -> torch.Tensor:
    """Uniform on the grid ``{0, 1, ..., 2^m - 1} * 2^-m`` (m <= 32, or 53 for float64)."""
    if m > 32:
        words = bits(k, (*shape, 2))
        mantissa = ((words[..., 0] >> (64 - m)) << 32) | words[..., 1]
        return mantissa.to(torch.float64) * 2.0**-m
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return ((bits(k, shape) >> (32 - m)).to(work) * 2.0**-m).to(dtype)


def _mantissa_bits(dtype: torch.dtype) -> int:
    return 1 - round(math.log2(torch.finfo(dtype).eps))  # float32: 24, bfloat16: 8


def _unit(k: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
    """Uniform in [0, 1) on a grid fine as the dtype's precision at 1, so never rounds to 1."""
    return _grid(k, shape, dtype, _mantissa_bits(dtype))


def uniform(
    k: torch.Tensor,
    shape: Shape = (),
    dtype: torch.dtype = torch.float32,
    low: float | torch.Tensor = 0.0,
    high: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Uniform floats in ``[low, high)``."""
    return low + (high - low) * _unit(k, shape, dtype)


def _open_unit(k: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
    """Uniform in the open interval (0, 1): the [0, 1) grid shifted by half a step."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    m = _mantissa_bits(work) - 1  # one bit coarser, so the half-step shift stays exact below 1
    return _grid(k, shape, work, m) + 2.0 ** -(m + 1)


def normal(
    k: torch.Tensor,
    shape: Shape = (),
    dtype: torch.dtype = torch.float32,
    mean: float = 0.0,
    std: float = 1.0,
) -> torch.Tensor:
    """Gaussian draws by the inverse CDF, ``sqrt(2) erfinv(2u - 1)``."""
    u = _open_unit(k, shape, dtype)
    return (mean + std * math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)).to(dtype)


def truncated_normal(
    k: torch.Tensor,
    shape: Shape = (),
    dtype: torch.dtype = torch.float32,
    lower: float = -2.0,
    upper: float = 2.0,
    std: float = 1.0,
) -> torch.Tensor:
    """Standard normal restricted to ``[lower, upper]`` (in units of the std), then scaled.

    Samples ``u`` uniformly in ``(Phi(lower), Phi(upper))`` and returns ``std * Phi^-1(u)``,
    clamped into the bounds against rounding.
    """
    if not lower < upper:
        raise ValueError(f"truncated_normal needs lower < upper, got {lower} and {upper}")
    cdf = lambda x: 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))  # noqa: E731
    a, b = cdf(lower), cdf(upper)
    u = a + (b - a) * _open_unit(k, shape, dtype)
    z = math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)
    return (std * z.clamp(lower, upper)).to(dtype)


def bernoulli(k: torch.Tensor, p: float | torch.Tensor, shape: Shape | None = None) -> torch.Tensor:
    """Booleans that are True with probability ``p`` (shape defaults to ``p``'s shape)."""
    p = torch.as_tensor(p, device=k.device)
    shape = tuple(p.shape) if shape is None else tuple(shape)
    return _unit(k, shape, torch.float32) < p


def randint(k: torch.Tensor, shape: Shape, low: int, high: int) -> torch.Tensor:
    """Integers uniform in ``[low, high)`` (``int64``); needs ``high - low <= 2^31``.

    ``low + floor(bits * span / 2^32)``: a bias below ``span / 2^32``, none for powers of 2.
    """
    span = high - low
    if not 0 < span <= 2**31:
        raise ValueError(f"randint needs 0 < high - low <= 2**31, got low={low}, high={high}")
    return low + ((bits(k, shape) * span) >> 32)


def gumbel(k: torch.Tensor, shape: Shape = (), dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard Gumbel draws, ``-log(-log u)``."""
    return -torch.log(-torch.log(_open_unit(k, shape, dtype))).to(dtype)


def categorical(k: torch.Tensor, logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Indices drawn with probabilities ``softmax(logits)`` along ``dim`` (Gumbel-max)."""
    noise = gumbel(k, logits.shape, torch.float32)
    return torch.argmax(logits.float() + noise, dim=dim)


def permutation(k: torch.Tensor, n: int) -> torch.Tensor:
    """A uniformly random permutation of ``range(n)`` (sorting random 32-bit words)."""
    return torch.argsort(bits(k, (n,)), dim=-1, stable=True)
