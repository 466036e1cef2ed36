"""Pipeline stages: a model cut into consecutive pure functions, one per pipeline rank.

A family cuts itself next to its own code (:meth:`GPT.stages <functional_llm.models.GPT.stages>`
and :meth:`BERT.stages <functional_llm.models.BERT.stages>` with :func:`cut`;
:meth:`Transformer.stages <functional_llm.models.Transformer.stages>`, whose stages pass two
activations); running the stages on ranks is :mod:`functional_llm.parallel.pipeline`'s business,
which knows no model. Composed in order, the stages compute the model's forward (without
dropout: a pipeline passes activations, not keys)::

    xs = (tokens,)                                     # (src, tgt) for the encoder-decoder
    for stage in model.stages(n):
        xs = stage.apply(stage.select(params), *xs)    # the logits at the end
        xs = xs if isinstance(xs, tuple) else (xs,)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from functional_llm.types import Params

__all__ = ["Stage", "block_ranges", "cut"]


@dataclass(frozen=True)
class Stage:
    """One stage: ``select(params)`` is its share of the full params, ``apply(p, x)`` its pure
    function of that share; ``shared`` names params another stage also holds (tied weights,
    whose gradients the pipeline sums)."""

    select: Callable[[Params], Params]
    apply: Callable[..., Any]  # (p, *activations) -> activations, or the logits at the end
    shared: tuple[str, ...] = ()
    # Which of the model's blocks this stage runs, per list of blocks: (("blocks", range(2, 4)),)
    # means its blocks.0 and blocks.1 are the model's blocks.2 and blocks.3.
    blocks: tuple[tuple[str, range], ...] = ()

    def full_path(self, path: str) -> str:
        """A path in this stage's params as the same param's path in the full model's."""
        for prefix, layers in self.blocks:
            if path.startswith(prefix + "."):
                index, _, tail = path[len(prefix) + 1 :].partition(".")
                return ".".join([prefix, str(layers[int(index)]), tail]).rstrip(".")
        return path


def block_ranges(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous, balanced block ranges (the first stages take one more when it doesn't
    divide)."""
    if not 1 <= n_stages <= n_layers:
        raise ValueError(f"stages: need 1 <= n_stages <= n_layers ({n_layers}), got {n_stages}")
    base, extra = divmod(n_layers, n_stages)
    bounds = [0]
    for s in range(n_stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return [range(bounds[s], bounds[s + 1]) for s in range(n_stages)]


def cut(
    n_layers: int,
    n_stages: int,
    *,
    embed: Callable[[Params, torch.Tensor], torch.Tensor],
    block: Callable[[Params, torch.Tensor], torch.Tensor],
    head: Callable[[Params, torch.Tensor], torch.Tensor],
    embed_params: Sequence[str],
    head_params: Sequence[str],
    tied: Sequence[str] = (),
) -> list[Stage]:
    """The stages of an ``embed -> blocks -> head`` model: stage ``s`` runs a contiguous range of
    ``params["blocks"]``, the first stage also ``embed(p, tokens)`` and the last ``head(p, h)``;
    ``embed_params`` and ``head_params`` name the top-level params those read, ``tied`` those
    both read (e.g. a tied embedding)."""
    stages = []
    for s, layers in enumerate(block_ranges(n_layers, n_stages)):
        first, last = s == 0, s == n_stages - 1
        names = (tuple(embed_params) if first else ()) + (tuple(head_params) if last else ())

        def select(params: Params, names: tuple = names, layers: range = layers) -> Params:
            own = {n: params[n] for n in dict.fromkeys(names) if n in params}
            return {**own, "blocks": [params["blocks"][i] for i in layers]}

        def apply(
            p: Params, x: torch.Tensor, first: bool = first, last: bool = last
        ) -> torch.Tensor:
            h = embed(p, x) if first else x
            for block_params in p["blocks"]:
                h = block(block_params, h)
            return head(p, h) if last else h

        shared = tuple(tied) if n_stages > 1 and (first or last) else ()
        stages.append(Stage(select, apply, shared, (("blocks", layers),)))
    return stages
