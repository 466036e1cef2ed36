"""Learning-rate schedules: pure functions of the step *tensor*.

Every schedule is built from ``torch.where``/``clamp`` arithmetic on the step, so a compiled
train step sees one graph for all steps and never recompiles as the step or value changes.
A Python int step works too (it is turned into a tensor).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from functional_llm.optim.base import Schedule

__all__ = [
    "constant",
    "cosine_decay",
    "join",
    "linear",
    "piecewise_constant",
    "warmup_cosine",
    "warmup_stable_decay",
]


def _step(count: torch.Tensor | int) -> torch.Tensor:
    return torch.as_tensor(count).to(torch.float32)


def _check(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def constant(value: float) -> Schedule:
    """``value`` at every step."""
    return lambda count: torch.full_like(_step(count), value)


def linear(
    init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    """``init`` until ``transition_begin``, then linearly to ``end`` over ``transition_steps``,
    then ``end``. With ``transition_steps=0`` there is no transition: ``init`` throughout, as
    in Optax."""
    _check("transition_steps", transition_steps)
    if transition_steps == 0:
        return constant(init_value)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        frac = ((_step(count) - transition_begin) / max(transition_steps, 1)).clamp(0.0, 1.0)
        return init_value + (end_value - init_value) * frac

    return schedule


def cosine_decay(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """``init * ((1 - alpha) (1 + cos(pi t / T)) / 2 + alpha)`` for ``t <= T``, then
    ``alpha * init`` (Loshchilov & Hutter 2017, without restarts)."""
    _check("decay_steps", decay_steps)

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        frac = (_step(count) / max(decay_steps, 1)).clamp(0.0, 1.0)
        return init_value * ((1 - alpha) * 0.5 * (1 + torch.cos(math.pi * frac)) + alpha)

    return schedule


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """``schedules[i]`` between ``boundaries[i-1]`` and ``boundaries[i]``; each schedule sees
    the steps since its own start."""
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"join needs len(schedules) - 1 boundaries, got {len(schedules)} and {len(boundaries)}"
        )
    if list(boundaries) != sorted(boundaries):
        raise ValueError(f"join boundaries must be increasing, got {list(boundaries)}")

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        step = _step(count)
        value = schedules[0](step)
        for start, s in zip(boundaries, schedules[1:], strict=True):
            value = torch.where(step >= start, s(step - start), value)
        return value

    return schedule


def warmup_cosine(
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    init_value: float = 0.0,
    end_value: float = 0.0,
) -> Schedule:
    """Linear warmup ``init -> peak`` over ``warmup_steps``, then cosine ``peak -> end`` until
    step ``decay_steps`` (counted from 0, warmup included, as in Optax), then ``end``. The
    cosine needs at least one step: ``decay_steps > warmup_steps`` (Optax raises too)."""
    if decay_steps <= warmup_steps:
        raise ValueError(f"decay_steps ({decay_steps}) must be > warmup_steps ({warmup_steps}): "
                         "the cosine part needs at least one step")  # fmt: skip
    alpha = end_value / peak_value if peak_value else 0.0
    return join(
        [
            linear(init_value, peak_value, warmup_steps),
            cosine_decay(peak_value, decay_steps - warmup_steps, alpha),
        ],
        [warmup_steps],
    )


def warmup_stable_decay(
    peak_value: float,
    warmup_steps: int,
    stable_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    init_value: float = 0.0,
) -> Schedule:
    """Warmup, a constant plateau, then a linear cool-down (the WSD schedule of MiniCPM,
    Hu et al. 2024): ``init -> peak`` over ``warmup_steps``, ``peak`` for ``stable_steps``,
    ``peak -> end`` over ``decay_steps``."""
    return join(
        [
            linear(init_value, peak_value, warmup_steps),
            constant(peak_value),
            linear(peak_value, end_value, decay_steps),
        ],
        [warmup_steps, warmup_steps + stable_steps],
    )


def piecewise_constant(init_value: float, boundaries_and_scales: dict[int, float]) -> Schedule:
    """``init_value``, multiplied by ``scale`` from each boundary step on (Optax's
    ``piecewise_constant_schedule``)."""

    def schedule(count: torch.Tensor | int) -> torch.Tensor:
        step = _step(count)
        value = torch.full_like(step, init_value)
        for boundary, s in sorted(boundaries_and_scales.items()):
            value = torch.where(step >= boundary, value * s, value)
        return value

    return schedule
