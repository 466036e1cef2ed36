"""LoRA (Hu et al. 2021): low-rank adapters as a transformation of the parameter pytree.

For each targeted weight ``W`` of a linear map with fan-in ``n`` and fan-out ``m``::

    W' = W + (alpha / r) A B        A: (n, r) ~ U(-1/sqrt(n), 1/sqrt(n)),  B: (r, m) = 0

so ``x W' = x W + (alpha / r) (x A) B``: the adapted model is the base model with ``W'``. Training
differentiates the loss of :meth:`LoRA.merge`\\ ``(base, adapters)`` with respect to the adapters
only; the base stays frozen (it is not an input of the gradient, so it cannot change), and the
adapters, ``r (n + m)`` numbers per weight, are all that is trained and saved. Since ``B``
starts at zero, the adapted model starts as the base model exactly.

Adapters mirror the params' nesting: ``{"blocks": [{"attn": {"q": {"w": {"a": A, "b": B}}}}]}``,
so they checkpoint, shard and print like any params. A weight's fan-in comes from its logical
axes (``model.axes()``): a weight whose first axis is ``embed`` maps from the model dimension
(``q, k, v, up``: fan-in is the first axis); any other maps into it (``o, down``: fan-in is every
axis but the last).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from functional_llm import random, tree
from functional_llm.types import PyTree

__all__ = ["LoRA"]


def _fan_in_dims(axes: tuple[str | None, ...]) -> int:
    return 1 if axes[0] == "embed" else len(axes) - 1


@dataclass(frozen=True, kw_only=True)
class LoRA:
    """Which weights get adapters (glob patterns over dotted paths), their rank and ``alpha``."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("*attn.[qkvo].w", "*mlp.*.w")

    def __post_init__(self) -> None:
        if self.rank <= 0 or self.alpha <= 0:
            raise ValueError(f"LoRA needs rank > 0 and alpha > 0, got {self.rank}, {self.alpha}")
        if not self.targets:
            raise ValueError("LoRA.targets is empty: no weight would be adapted")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def init(self, key: torch.Tensor, params: PyTree, axes: PyTree) -> PyTree:
        """Adapters for every weight of ``params`` whose path matches ``targets`` (``axes``:
        the model's ``axes()``, giving each weight's fan-in)."""
        all_axes = tree.flatten_axes(axes)
        tree.require_matches("LoRA.targets", tree.paths(params), tuple(self.targets))
        chosen = tree.select(params, *self.targets)
        flat = {}
        for i, (path, w) in enumerate(chosen.items()):
            if w.ndim < 2:
                raise ValueError(f"LoRA target {path} has shape {tuple(w.shape)}: not a matrix")
            if path not in all_axes:
                raise ValueError(f"LoRA: no axes given for {path}")
            k = _fan_in_dims(all_axes[path])
            n, m = math.prod(w.shape[:k]), math.prod(w.shape[k:])
            bound = 1.0 / math.sqrt(n)
            a = random.uniform(random.fold_in(key, i), (n, self.rank), w.dtype, -bound, bound)
            flat[f"{path}.a"] = a.to(w.device)
            flat[f"{path}.b"] = torch.zeros(self.rank, m, dtype=w.dtype, device=w.device)
        return tree.unflatten(flat)

    def _deltas(self, adapters: PyTree) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        flat = tree.flatten(adapters)
        return {
            path[:-2]: (flat[path], flat[path[:-2] + ".b"]) for path in flat if path.endswith(".a")
        }

    def _shift(self, params: PyTree, adapters: PyTree, sign: float) -> PyTree:
        pairs = self._deltas(adapters)
        unknown = set(pairs) - set(tree.paths(params))
        if unknown:
            raise ValueError(f"LoRA adapters for {sorted(unknown)}, which params do not have")

        def shifted(path: str, w: torch.Tensor) -> torch.Tensor:
            if path not in pairs:
                return w
            a, b = pairs[path]
            return w + (sign * self.scale) * (a @ b).reshape(w.shape)

        return tree.map_with_path(shifted, params)

    def merge(self, params: PyTree, adapters: PyTree) -> PyTree:
        """``W + (alpha / r) A B`` at every adapted weight; other leaves are shared as they are."""
        return self._shift(params, adapters, 1.0)

    def unmerge(self, merged: PyTree, adapters: PyTree) -> PyTree:
        """The inverse of :meth:`merge`: ``W' - (alpha / r) A B``."""
        return self._shift(merged, adapters, -1.0)

    def linear(
        self, x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor
    ) -> torch.Tensor:
        """The unmerged form of one adapted linear map, ``x W + (alpha / r) (x A) B``, for
        ``x: (..., n)`` and ``W`` viewed as ``(n, m)``: what the merged weight must equal."""
        return x @ w.reshape(a.shape[0], -1) + self.scale * (x @ a) @ b
