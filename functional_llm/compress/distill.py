"""Knowledge distillation (Hinton et al. 2015): a student learns the teacher's softened
distribution beside the labels.

    p_T = softmax(z_teacher / T),  q_T = softmax(z_student / T)
    KL_T = T^2 sum_c p_T,c (log p_T,c - log q_T,c)      (T^2 keeps its gradient's scale in T)
    loss = alpha KL_T + (1 - alpha) CE(z_student, labels)

The teacher is frozen: its params are closed over (not in the train state, so no optimizer
state), and its forward pass runs under ``no_grad``, so it gets no gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from functional_llm.losses import cross_entropy
from functional_llm.types import Batch, LossFn, Metrics

__all__ = ["distill", "kl_divergence"]


def kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T^2 KL(p_T || q_T)`` averaged over positions (those where ``valid`` is True)."""
    if temperature <= 0:
        raise ValueError(f"kl_divergence: temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kl_divergence: student logits {tuple(student_logits.shape)} and "
                         f"teacher logits {tuple(teacher_logits.shape)} differ")  # fmt: skip
    up = lambda z: z.float() if z.dtype in (torch.float16, torch.bfloat16) else z  # noqa: E731
    log_q = torch.log_softmax(up(student_logits) / temperature, dim=-1)
    log_p = torch.log_softmax(up(teacher_logits).to(log_q.dtype) / temperature, dim=-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2
    if valid is None:
        return per_position.mean()
    return (per_position * valid).sum() / valid.sum().clamp(min=1)


def distill(
    student_logits: Callable[[Any, Batch, torch.Tensor | None], torch.Tensor],
    teacher_logits: Callable[[Any, Batch], torch.Tensor],
    teacher_params: Any,
    *,
    alpha: float = 0.5,
    temperature: float = 2.0,
    labels: str = "targets",
) -> LossFn:
    """A loss for ``make_step``: ``alpha`` times the KL to the frozen teacher at
    ``temperature`` plus ``1 - alpha`` times the cross-entropy against ``batch[labels]``.
    ``student_logits(params, batch, key)`` and ``teacher_logits(teacher_params, batch)`` give
    logits of one shape (for a GPT: ``lambda p, b, k: model.apply(p, b["inputs"], key=k)``).
    aux: ``loss``, ``kl``, ``nll``, ``accuracy``, ``count`` (of the hard labels)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distill: alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"distill: temperature must be positive, got {temperature}")

    def loss_fn(params: Any, batch: Batch, key: torch.Tensor | None = None) -> tuple:
        z = student_logits(params, batch, key)
        with torch.no_grad():
            teacher = teacher_logits(teacher_params, batch)
        kl = kl_divergence(z, teacher, temperature, batch.get("valid"))
        hard, aux = cross_entropy(z, batch[labels])
        loss = alpha * kl + (1 - alpha) * hard
        metrics: Metrics = {**aux, "loss": loss.detach(), "kl": kl.detach()}
        return loss, metrics

    return loss_fn
