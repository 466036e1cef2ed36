"""Curvature of a loss over param pytrees, matrix-free: Hessian- and Gauss-Newton-vector
products, extreme Hessian eigenvalues and the Hessian trace.

    H v = d/dt grad L(p + t v) |_(t=0)         forward-over-reverse: jvp of grad (:func:`hvp`)
    G v = J^T H_z J v,  J = dz/dp, H_z = d^2 L/dz^2   for L(p) = loss(z(p)) (:func:`gnvp`)
    lambda_max: Lanczos (or power iteration) on v -> H v (:func:`top_eigenvalue`)
    tr(H) = E[z^T H z], z Rademacher              Hutchinson's estimator (:func:`hessian_trace`)

The Gauss-Newton matrix ``G`` is ``H`` without the term of the outputs' own curvature: positive
semi-definite when ``loss`` is convex in the outputs (cross-entropy in the logits). Every
function takes params and vectors as pytrees of one structure; use float64 to check them
against explicit matrices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import optree
import torch

from functional_llm import random
from functional_llm.types import Key, PyTree

__all__ = ["Spectrum", "gnvp", "hessian_trace", "hvp", "lanczos", "top_eigenvalue"]

Product = Callable[[PyTree], PyTree]


def _dot(a: PyTree, b: PyTree) -> torch.Tensor:
    return sum(
        (x * y).sum() for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True)
    )  # type: ignore[return-value]


def _axpy(alpha: torch.Tensor | float, x: PyTree, y: PyTree) -> PyTree:
    """``alpha x + y``."""
    return optree.tree_map(lambda a, b: alpha * a + b, x, y)


def _scale(alpha: torch.Tensor | float, x: PyTree) -> PyTree:
    return optree.tree_map(lambda a: alpha * a, x)


def _random_like(key: Key, like: PyTree, rademacher: bool = False) -> PyTree:
    leaves, spec = optree.tree_flatten(like)
    keys = random.split(key, len(leaves))
    draws = []
    for k, x in zip(keys, leaves, strict=True):
        if rademacher:
            draws.append(random.bernoulli(k, 0.5, x.shape).to(x.dtype) * 2 - 1)
        else:
            draws.append(random.normal(k, x.shape, dtype=x.dtype))
    return optree.tree_unflatten(spec, draws)


def hvp(loss: Callable[[PyTree], torch.Tensor], params: PyTree, v: PyTree) -> PyTree:
    """The Hessian of ``loss`` at ``params`` times ``v``: one forward-mode pass over the
    gradient (``torch.func.jvp`` of ``torch.func.grad``), no Hessian is formed."""
    return torch.func.jvp(torch.func.grad(loss), (params,), (v,))[1]


def gnvp(
    outputs: Callable[[PyTree], torch.Tensor],
    loss: Callable[[torch.Tensor], torch.Tensor],
    params: PyTree,
    v: PyTree,
) -> PyTree:
    """The Gauss-Newton matrix ``J^T H_z J`` times ``v``, for ``z = outputs(params)`` and
    ``H_z`` the Hessian of ``loss`` in ``z``: a jvp through the model, an HVP of the loss in
    the outputs, a vjp back."""
    z, jv = torch.func.jvp(outputs, (params,), (v,))[:2]
    h_jv = torch.func.jvp(torch.func.grad(loss), (z,), (jv,))[1]
    pullback = torch.func.vjp(outputs, params)[1]
    return pullback(h_jv)[0]


class Spectrum(NamedTuple):
    """Ritz values (ascending) of a symmetric operator from :func:`lanczos`, and the
    eigenvector estimate of the largest."""

    values: torch.Tensor
    top_vector: PyTree


def lanczos(product: Product, like: PyTree, key: Key, iters: int = 20) -> Spectrum:
    """``iters`` steps of Lanczos with full reorthogonalisation on the symmetric operator
    ``product`` (e.g. ``lambda v: hvp(loss, params, v)``) from a random start shaped like
    ``like``. Its extreme Ritz values converge first, the largest and the smallest alike."""
    if iters < 1:
        raise ValueError(f"lanczos: iters must be >= 1, got {iters}")
    q = _random_like(key, like)
    q = _scale(1 / torch.sqrt(_dot(q, q)), q)
    basis, alphas, betas = [q], [], []
    for j in range(iters):
        w = product(basis[j])
        alpha = _dot(w, basis[j])
        alphas.append(alpha)
        for b in basis:  # full reorthogonalisation: the basis stays orthonormal in floating point
            w = _axpy(-_dot(w, b), b, w)
        beta = torch.sqrt(_dot(w, w))
        if j == iters - 1 or beta <= 1e-10 * max(1.0, float(alpha.abs())):
            break
        betas.append(beta)
        basis.append(_scale(1 / beta, w))
    k = len(alphas)
    t = torch.diag(torch.stack(alphas))
    if k > 1:
        off = torch.stack(betas[: k - 1])
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(t)
    top = vectors[:, -1]
    vector = _scale(top[0], basis[0])
    for i in range(1, k):
        vector = _axpy(top[i], basis[i], vector)
    return Spectrum(values, vector)


def top_eigenvalue(
    product: Product,
    like: PyTree,
    key: Key,
    *,
    iters: int = 20,
    method: str = "lanczos",
) -> torch.Tensor:
    """The largest eigenvalue of the symmetric operator ``product``: by Lanczos (the
    algebraically largest Ritz value), or by power iteration (``method="power"``: the
    eigenvalue of largest magnitude, as a Rayleigh quotient)."""
    if method == "lanczos":
        return lanczos(product, like, key, iters).values[-1]
    if method != "power":
        raise ValueError(f"top_eigenvalue: method must be 'lanczos' or 'power', got {method!r}")
    v = _random_like(key, like)
    value = torch.zeros(())
    for _ in range(iters):
        v = _scale(1 / torch.sqrt(_dot(v, v)), v)
        hv = product(v)
        value = _dot(v, hv)
        v = hv
    return value


def hessian_trace(
    product: Product, like: PyTree, key: Key, samples: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hutchinson's estimate of ``tr(H)`` as ``(mean, standard error)`` over ``samples``
    Rademacher probes ``z`` (``E[z^T H z] = tr(H)``)."""
    if samples < 2:
        raise ValueError(f"hessian_trace: samples must be >= 2, got {samples}")
    draws = []
    for k in random.split(key, samples):
        z = _random_like(k, like, rademacher=True)
        draws.append(_dot(z, product(z)))
    values = torch.stack(draws)
    return values.mean(), values.std() / math.sqrt(samples)
