"""Curvature against explicit matrices, in float64 on a GPT small enough to form its Hessian:
HVP = H v, Gauss-Newton products = J^T H_z J v, Lanczos' top eigenvalue = eigvalsh's, power
iteration on the (PSD) Gauss-Newton matrix = its top eigenvalue, Hutchinson's trace within its
own standard error of tr(H).

The explicit Hessian is the central finite difference of autograd gradients, column by column:
``torch.autograd.functional.hessian`` cannot differentiate SDPA's CPU backward, and
``torch.func.hessian`` (``jacfwd(jacrev)``) is wrong in torch 2.13 where LayerNorm's weight meets
its input (asymmetric, off by 10 on a 3x4 layer norm), while ``jvp`` and ``vjp`` of ``grad`` agree
with autograd."""

from __future__ import annotations

import math

import pytest
import torch

import functional_llm as fl
from functional_llm import curvature, losses, random

CFG = fl.models.GPTConfig(vocab_size=7, max_seq_len=5, d_model=4, n_layers=1, n_heads=2,
                          dtype=torch.float64)  # fmt: skip
MODEL = fl.models.GPT(CFG)
PARAMS = MODEL.init(random.key(0))
TOKENS = random.randint(random.key(1), (3, 6), 0, 7)
BATCH = {"inputs": TOKENS[:, :-1], "targets": TOKENS[:, 1:]}
PATHS = fl.tree.paths(PARAMS)
SHAPES = [x.shape for x in fl.tree.leaves(PARAMS)]


def _unflat(flat: torch.Tensor) -> dict:
    parts = torch.split(flat, [math.prod(s) for s in SHAPES])
    return fl.tree.unflatten(
        {p: x.reshape(s) for p, x, s in zip(PATHS, parts, SHAPES, strict=True)}, PARAMS
    )


def _flat(tree: dict) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in fl.tree.leaves(tree)])


def loss(params: dict) -> torch.Tensor:
    return losses.next_token(MODEL)(params, BATCH, None)[0]


def outputs(params: dict) -> torch.Tensor:
    return MODEL.apply(params, BATCH["inputs"])


def loss_of_logits(z: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(z.reshape(-1, 7), BATCH["targets"].reshape(-1))


def _gradient(flat: torch.Tensor) -> torch.Tensor:
    (_, _), grads = fl.train.value_and_grad(lambda p: (loss(p), {}))(_unflat(flat))
    return _flat(grads)


@pytest.fixture(scope="module")
def hessian() -> torch.Tensor:
    """Central differences of the gradient, step 1e-6 (truncation error about 1e-7 here)."""
    flat, h = _flat(PARAMS), 1e-6
    eye = torch.eye(flat.shape[0], dtype=torch.float64)
    columns = [(_gradient(flat + h * e) - _gradient(flat - h * e)) / (2 * h) for e in eye]
    explicit = torch.stack(columns, dim=1)
    return (explicit + explicit.T) / 2


def test_hvp_equals_the_explicit_hessian_times_v(hessian: torch.Tensor) -> None:
    v = torch.randn(
        hessian.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    got = _flat(curvature.hvp(loss, PARAMS, _unflat(v)))
    torch.testing.assert_close(got, hessian @ v, rtol=1e-6, atol=2e-6)


def test_gauss_newton_products_equal_j_transpose_h_j() -> None:
    flat = _flat(PARAMS)
    jac = torch.func.jacrev(lambda f: outputs(_unflat(f)).reshape(-1))(flat)
    z = outputs(PARAMS).reshape(-1)
    h_z = torch.func.hessian(lambda y: loss_of_logits(y.reshape(3, 5, 7)))(z)
    gn = jac.T @ h_z @ jac
    v = torch.randn(flat.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = _flat(curvature.gnvp(outputs, loss_of_logits, PARAMS, _unflat(v)))
    torch.testing.assert_close(got, gn @ v, rtol=1e-9, atol=1e-11)
    # G is positive semi-definite: power iteration finds its top eigenvalue
    power = curvature.top_eigenvalue(
        lambda u: curvature.gnvp(outputs, loss_of_logits, PARAMS, u), PARAMS, random.key(2),
        iters=300, method="power",
    )  # fmt: skip
    assert float(power) == pytest.approx(float(torch.linalg.eigvalsh(gn)[-1]), rel=1e-6)


def test_lanczos_finds_the_top_eigenvalue(hessian: torch.Tensor) -> None:
    top = curvature.top_eigenvalue(lambda u: curvature.hvp(loss, PARAMS, u), PARAMS, random.key(3),
                                   iters=60)  # fmt: skip
    assert float(top) == pytest.approx(float(torch.linalg.eigvalsh(hessian)[-1]), rel=1e-7)
    spectrum = curvature.lanczos(
        lambda u: curvature.hvp(loss, PARAMS, u), PARAMS, random.key(3), 60
    )
    vector = _flat(spectrum.top_vector)
    torch.testing.assert_close(hessian @ vector, top * vector, rtol=1e-5, atol=1e-6)


def test_hutchinson_estimates_the_trace(hessian: torch.Tensor) -> None:
    mean, stderr = curvature.hessian_trace(
        lambda u: curvature.hvp(loss, PARAMS, u), PARAMS, random.key(4), samples=200
    )
    assert abs(float(mean) - float(hessian.trace())) < 4 * float(stderr)
    assert float(stderr) > 0


def test_bad_curvature_requests_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="method must be 'lanczos' or 'power'"):
        curvature.top_eigenvalue(lambda u: u, PARAMS, random.key(0), method="qr")
    with pytest.raises(ValueError, match="samples must be >= 2"):
        curvature.hessian_trace(lambda u: u, PARAMS, random.key(0), samples=1)
