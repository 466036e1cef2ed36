"""Arithmetic on lists of leaves: the one place the optimizers call ``torch._foreach_*``.

Each function takes lists of tensors (the flattened leaves of a tree) and returns new ones,
one kernel launch per operation for all leaves, as ``torch.optim``'s ``foreach`` path does.
Scalars may be Python numbers or 0-dim tensors (what :func:`inject_hyperparams` passes); the
functions pick the kernel that takes each. Those with a trailing underscore (:func:`add_`,
:func:`add_scaled_`, :func:`mul_`, :func:`fused_adamw_`) write into their first argument; the
others return new tensors.

The ``_foreach`` kernels have no ``vmap`` batching rules, so under ``torch.func`` transforms
(an ensemble's vmapped step) every function runs leaf by leaf instead: the same arithmetic,
batched by vmap.
"""

from __future__ import annotations

import torch

Leaves = list[torch.Tensor]
Scalar = float | torch.Tensor


def _per_leaf() -> bool:
    """True inside ``torch.func`` transforms, where the foreach kernels cannot be batched."""
    return torch._C._are_functorch_transforms_active()


def add(x: Leaves, y: Leaves, alpha: Scalar = 1.0) -> Leaves:
    """``x + alpha * y`` (one pass when ``alpha`` is a Python number)."""
    if _per_leaf():
        return [a + alpha * b for a, b in zip(x, y, strict=True)]
    if isinstance(alpha, torch.Tensor):
        return list(torch._foreach_add(x, torch._foreach_mul(y, alpha)))
    return list(torch._foreach_add(x, y, alpha=alpha))


def add_(x: Leaves, y: Leaves) -> None:
    """``x += y`` in place."""
    if _per_leaf():
        for a, b in zip(x, y, strict=True):
            a.add_(b)
        return
    torch._foreach_add_(x, y)


def add_scaled_(x: Leaves, y: Leaves, alpha: Scalar) -> None:
    """``x += alpha * y`` in place: the same bits as :func:`add` gives."""
    if _per_leaf():
        for a, b in zip(x, y, strict=True):
            a.add_(alpha * b)
    elif isinstance(alpha, torch.Tensor):
        torch._foreach_add_(x, torch._foreach_mul(y, alpha))
    else:
        torch._foreach_add_(x, y, alpha=alpha)


def mul_(x: Leaves, s: Scalar) -> None:
    """``x *= s`` in place: the same bits as :func:`mul` gives."""
    if _per_leaf():
        for a in x:
            a.mul_(s)
    else:
        torch._foreach_mul_(x, s)


def add_scalar(x: Leaves, s: Scalar) -> Leaves:
    """``x + s``."""
    if _per_leaf():
        return [a + s for a in x]
    return list(torch._foreach_add(x, s))


def sub(x: Leaves, y: Leaves) -> Leaves:
    if _per_leaf():
        return [a - b for a, b in zip(x, y, strict=True)]
    return list(torch._foreach_sub(x, y))


def mul(x: Leaves, y: Scalar | Leaves) -> Leaves:
    """``x * y``: ``y`` a scalar, or one scalar or tensor per leaf."""
    if _per_leaf():
        ys = y if isinstance(y, list | tuple) else [y] * len(x)
        return [a * b for a, b in zip(x, ys, strict=True)]
    return list(torch._foreach_mul(x, y))


def div(x: Leaves, y: Scalar | Leaves) -> Leaves:
    if _per_leaf():
        ys = y if isinstance(y, list | tuple) else [y] * len(x)
        return [a / b for a, b in zip(x, ys, strict=True)]
    return list(torch._foreach_div(x, y))


def sqrt(x: Leaves) -> Leaves:
    if _per_leaf():
        return [a.sqrt() for a in x]
    return list(torch._foreach_sqrt(x))


def sign(x: Leaves) -> Leaves:
    if _per_leaf():
        return [a.sign() for a in x]
    return list(torch._foreach_sign(x))


def norms(x: Leaves) -> Leaves:
    """The L2 norm of each leaf."""
    if _per_leaf():
        return [torch.linalg.vector_norm(a) for a in x]
    return list(torch._foreach_norm(x))


def clamp(x: Leaves, low: float, high: float) -> Leaves:
    if _per_leaf():
        return [a.clamp(low, high) for a in x]
    out = torch._foreach_clamp_min(x, low)
    torch._foreach_clamp_max_(out, high)
    return list(out)


def ema(avg: Leaves, new: Leaves, decay: Scalar) -> Leaves:
    """``decay * avg + (1 - decay) * new`` (``lerp``, as torch.optim)."""
    weight = 1.0 - decay  # a 0-dim tensor weight works at run time; torch's stub lists floats
    if _per_leaf():
        return [torch.lerp(a, b, weight) for a, b in zip(avg, new, strict=True)]
    return list(torch._foreach_lerp(avg, new, weight))  # pyright: ignore[reportCallIssue,reportArgumentType]


def ema_of_squares(avg: Leaves, g: Leaves, decay: Scalar) -> Leaves:
    """``decay * avg + (1 - decay) * g^2``."""
    out = mul(avg, decay)
    if _per_leaf():
        return [o + (1.0 - decay) * b * b for o, b in zip(out, g, strict=True)]
    if isinstance(decay, torch.Tensor):  # addcmul_ takes a Python scalar only
        add_(out, mul(mul(g, g), 1.0 - decay))
    else:
        torch._foreach_addcmul_(out, g, g, value=1.0 - decay)
    return out


def adam_direction(
    mu: Leaves, nu: Leaves, t: torch.Tensor, b1: Scalar, b2: Scalar, eps: Scalar, eps_root: Scalar
) -> Leaves:
    """``(mu / (1 - b1^t)) / (sqrt((nu + eps_root) / (1 - b2^t)) + eps)``, in torch.optim's
    order of operations (bias corrections in float64, as it computes them on the host)."""
    denom = sqrt(add_scalar(nu, eps_root) if eps_root else nu)
    c1 = bias_correction(b1, t).to(mu[0].dtype)
    c2 = torch.sqrt(bias_correction(b2, t)).to(mu[0].dtype)
    if _per_leaf():
        return [m / (d / c2 + eps) / c1 for m, d in zip(mu, denom, strict=True)]
    tracked = torch.is_grad_enabled() and any(x.requires_grad for x in (*mu, *denom))
    if tracked or torch.compiler.is_compiling() or any(type(d) is not torch.Tensor for d in denom):
        # out of place: autograd needs sqrt's output as it was (a step differentiated through)
        denom = torch._foreach_add(torch._foreach_div(denom, c2), eps)
        return list(torch._foreach_div(torch._foreach_div(mu, denom), c1))
    # eagerly, the same arithmetic in the denominator's buffers (ours): two fewer tensors
    torch._foreach_div_(denom, c2)
    torch._foreach_add_(denom, eps)
    u = [torch.div(m, d, out=d) for m, d in zip(mu, denom, strict=True)]
    torch._foreach_div_(u, c1)
    return u


def bias_correction(decay: Scalar, t: torch.Tensor) -> torch.Tensor:
    """``1 - decay^t`` in float64."""
    return 1.0 - torch.pow(
        torch.as_tensor(decay, dtype=torch.float64, device=t.device), t.to(torch.float64)
    )


def fused_adamw_(
    p: Leaves,
    g: Leaves,
    mu: Leaves,
    nu: Leaves,
    step: torch.Tensor,
    *,
    lr: Scalar,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """AdamW in place with ``torch.optim.AdamW(fused=True)``'s kernel: ``p``, ``mu`` and ``nu``
    are overwritten; ``step`` (float32) is the step number after this one."""
    torch._fused_adamw_(
        p,
        g,
        mu,
        nu,
        [],
        [step] * len(p),
        amsgrad=False,
        lr=lr,
        beta1=b1,
        beta2=b2,
        weight_decay=weight_decay,
        eps=eps,
        maximize=False,
    )
