"""Validation helpers for frozen model configs: each error names the field and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["check_choice", "check_divides", "check_positive", "check_rate"]


def _field(config: Any, name: str) -> tuple[str, Any]:
    return f"{type(config).__name__}.{name}", getattr(config, name)


def check_positive(config: Any, *names: str) -> None:
    """Each named field must be a positive int."""
    for name in names:
        label, value = _field(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")


def check_rate(config: Any, *names: str) -> None:
    """Each named field must be a probability in [0, 1)."""
    for name in names:
        label, value = _field(config, name)
        if not isinstance(value, int | float) or not 0.0 <= value < 1.0:
            raise ValueError(f"{label} must be in [0, 1), got {value!r}")


def check_choice(config: Any, name: str, allowed: Iterable[str]) -> None:
    label, value = _field(config, name)
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{label} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_divides(config: Any, divisor: str, dividend: str) -> None:
    """Field ``divisor`` must divide field ``dividend``."""
    d_label, d = _field(config, divisor)
    n_label, n = _field(config, dividend)
    if n % d:
        raise ValueError(f"{d_label} ({d}) must divide {n_label} ({n})")
