"""Attribution as pure functions of a differentiable ``f(inputs) -> (batch,)`` scores:

    gradient x input:      a_i = x_i * df/dx_i
    integrated gradients:  a_i = (x_i - x'_i) * integral_0^1 df/dx_i(x' + a (x - x')) da
    attention rollout:     R = prod_l (A_l + I) / 2, rows renormalised   (Abnar & Zuidema 2020)

Integrated gradients (Sundararajan et al. 2017) are complete: ``sum_i a_i = f(x) - f(x')`` up to
the quadrature's error; :func:`integrated_gradients` returns that error so it can be checked.
The integral is taken with the trapezoid rule or Gauss-Legendre nodes, as captum does.
:func:`token_attributions` applies them to any model's token embeddings (positions held fixed),
through the embedding's tap: a classifier's label, an LM's next token, a translation's word.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from functional_llm.nn.taps import capture

__all__ = [
    "Attribution",
    "attention_rollout",
    "gradient_x_input",
    "integrated_gradients",
    "log_prob",
    "token_attributions",
]

Scores = Callable[[torch.Tensor], torch.Tensor]


class Attribution(NamedTuple):
    """Per-input attributions and, for integrated gradients, the completeness error
    ``sum a - (f(x) - f(x'))`` per example (zero for gradient x input, where it is undefined)."""

    values: torch.Tensor
    delta: torch.Tensor


def _grad(f: Scores, x: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        return torch.autograd.grad(f(x).sum(), x)[0]


def gradient_x_input(f: Scores, x: torch.Tensor) -> Attribution:
    """``x * df/dx`` (the first-order Taylor term of each input)."""
    return Attribution(x * _grad(f, x), torch.zeros(x.shape[0], dtype=x.dtype))


def _nodes(steps: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Points ``a`` in [0, 1] and weights of the quadrature of ``int_0^1 g(a) da``."""
    if method == "riemann_trapezoid":
        alphas = np.linspace(0, 1, steps)
        weights = np.full(steps, 1 / (steps - 1))
        weights[[0, -1]] /= 2
        return alphas, weights
    if method == "gausslegendre":
        nodes, w = np.polynomial.legendre.leggauss(steps)
        return (nodes + 1) / 2, w / 2
    raise ValueError(
        "integrated_gradients: method must be 'riemann_trapezoid' or 'gausslegendre', "
        f"got {method!r}"
    )


def integrated_gradients(
    f: Scores,
    x: torch.Tensor,
    baseline: torch.Tensor | None = None,
    *,
    steps: int = 50,
    method: str = "gausslegendre",
) -> Attribution:
    """Integrated gradients of ``f`` from ``baseline`` (zeros by default) to ``x``, with
    ``steps`` quadrature points; ``delta`` is the completeness error per example."""
    if steps < 2:
        raise ValueError(f"integrated_gradients: steps must be >= 2, got {steps}")
    base = torch.zeros_like(x) if baseline is None else baseline.expand_as(x)
    alphas, weights = _nodes(steps, method)
    total = torch.zeros_like(x)
    for a, w in zip(alphas.tolist(), weights.tolist(), strict=True):
        total = total + w * _grad(f, base + a * (x - base))
    values = (x - base) * total
    with torch.no_grad():
        gap = f(x) - f(base)
    delta = values.reshape(x.shape[0], -1).sum(-1) - gap
    return Attribution(values, delta)


def attention_rollout(weights: list[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Attention rollout over layers: each layer's head-mean attention ``(B, T, T)`` mixed with
    the residual path, ``residual I + (1 - residual) A``, rows renormalised, multiplied from the
    first layer up. ``weights``: per layer ``(B, heads, T, T)``. Row ``t`` of the result says
    how much each input token flows into position ``t``."""
    if not weights:
        raise ValueError("attention_rollout: no layers")
    eye = torch.eye(weights[0].shape[-1], dtype=weights[0].dtype)
    rollout = None
    for w in weights:
        a = residual * eye + (1 - residual) * w.mean(dim=1)
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout  # type: ignore[return-value]


def log_prob(index: int | torch.Tensor, position: int | None = -1) -> Scores:
    """A target for attribution: ``log softmax(out)[..., index]`` per example, at sequence
    ``position`` of ``(B, T, V)`` logits (an LM's next token), or of ``(B, C)`` scores with
    ``position=None`` (a classifier's label). ``index`` is one id or ``(B,)`` ids; an id
    outside the scores' range is an error naming both."""

    def target(out: torch.Tensor) -> torch.Tensor:
        scores = out if position is None else out[:, position]
        idx = torch.as_tensor(index, device=scores.device).expand(scores.shape[0])
        size = scores.shape[-1]
        if bool(((idx < 0) | (idx >= size)).any()):
            raise ValueError(
                f"attribution target {idx.tolist()} is outside the {size} scores (0..{size - 1})"
            )
        wide = scores if scores.dtype == torch.float64 else scores.float()
        return torch.log_softmax(wide, -1).gather(-1, idx[:, None]).squeeze(-1)

    return target


def token_attributions(
    model: Any,
    params: Any,
    *inputs: Any,
    target: Scores,
    embedding: str = "embed",
    method: str = "integrated_gradients",
    steps: int = 50,
    **kwargs: Any,
) -> Attribution:
    """Attributions ``(B, T)`` of ``target(model.apply(params, *inputs, **kwargs)) -> (B,)`` to
    each token, through its token embedding (the ``<embedding>.output`` tap: the lookup alone,
    positions and segments held fixed), summed over the embedding dim. The baseline is the
    zero embedding. ``embedding`` is the table's name in the params (``"embed"``; the
    encoder-decoder's ``"src_embed"`` or ``"tgt_embed"``); a task head's backbone is found."""
    if getattr(getattr(model, "config", None), "dropout", 0.0):
        raise ValueError("token_attributions: evaluate fl.nn.inference(model), without dropout")
    site, x = _embedding(model, params, inputs, kwargs, embedding)

    def f(e: torch.Tensor) -> torch.Tensor:
        return target(capture(model.apply, params, *inputs, only=(), patch={site: e}, **kwargs)[0])

    if method == "integrated_gradients":
        out = integrated_gradients(f, x, steps=steps)
    elif method == "gradient_x_input":
        out = gradient_x_input(f, x)
    else:
        raise ValueError(
            f"method must be 'integrated_gradients' or 'gradient_x_input', got {method!r}"
        )
    return Attribution(out.values.sum(-1), out.delta)


def _embedding(
    model: Any, params: Any, inputs: tuple, kwargs: dict, embedding: str
) -> tuple[str, torch.Tensor]:
    """The site of the ``embedding`` table's lookup and its value, from one forward pass."""
    with torch.no_grad():
        _, acts = capture(model.apply, params, *inputs, only="*.output", **kwargs)
    name = f"{embedding}.output"
    found = [s for s in acts if s == name or s.endswith(f".{name}")]
    if len(found) != 1:
        tables = sorted(s[: -len(".output")] for s in acts if s.endswith("embed.output"))
        raise ValueError(f"no single embedding {embedding!r} in the params; they have {tables}")
    return found[0], acts[found[0]]
