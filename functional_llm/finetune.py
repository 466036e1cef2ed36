"""Fine-tuning mechanics: a pretrained backbone under a fresh head, frozen parameters, and
layer-wise learning-rate decay, each a small function over the params pytree.

    params = with_backbone(head_model.init(key), checkpoint.load("bert.safetensors"))
    opt = freeze(optim.adamw(lr), "backbone.embed.*")          # no update, no optimizer state
    opt = optim.chain(opt, layerwise_decay(0.8, num_layers=4))

The task heads' params are ``{"backbone": ..., "head": ...}`` (:mod:`functional_llm.models.heads`),
so attaching a pretrained backbone replaces one subtree, after checking that every path and
shape fits.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from functional_llm import tree
from functional_llm.models import GPT
from functional_llm.nn.module import check_tree
from functional_llm.optim import (
    EmptyState,
    GradientTransformation,
    labels_by_path,
    multi_transform,
    set_to_zero,
)
from functional_llm.tree import Pattern
from functional_llm.types import PyTree

__all__ = [
    "count_trainable",
    "freeze",
    "layer_index",
    "layerwise_decay",
    "resize_vocab",
    "with_backbone",
]


def with_backbone(params: PyTree, pretrained: PyTree) -> PyTree:
    """``params`` (a head model's ``{"backbone", "head"}``) with its backbone replaced by
    ``pretrained``, which must have the backbone's structure, shapes and dtypes: an error names
    each path that does not fit (:func:`~functional_llm.nn.module.check_tree`)."""
    check_tree(pretrained, params["backbone"], "backbone")
    want = tree.flatten(params["backbone"])
    for path, x in tree.flatten(pretrained).items():
        if x.dtype != want[path].dtype:
            raise ValueError(
                f"pretrained backbone.{path} is {x.dtype}, the model wants {want[path].dtype}"
            )
    return {**params, "backbone": pretrained}


def freeze(
    optimizer: GradientTransformation, *patterns: Pattern, allow_empty: bool = False
) -> GradientTransformation:
    """``optimizer`` for every parameter except those whose path matches a pattern: those get
    zero updates and no optimizer state (:func:`~functional_llm.optim.multi_transform`).
    ``init`` refuses a pattern that matches no param (a typo) unless ``allow_empty``."""
    if not patterns:
        raise ValueError("freeze: give at least one path pattern")
    labels = labels_by_path(dict.fromkeys(patterns, "frozen"), "trained")
    inner = multi_transform({"trained": optimizer, "frozen": set_to_zero()}, labels)
    if allow_empty:
        return inner

    def init(params: PyTree) -> PyTree:
        tree.require_matches("freeze", tree.paths(params), patterns)
        return inner.init(params)

    return inner._replace(init=init)


_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBEDDINGS = {"embed", "pos", "types", "embed_norm"}


def layer_index(path: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise decay: 0 for the embeddings (``embed``, ``pos``,
    ``types``, ``embed_norm``), ``i + 1`` inside ``blocks.i``, ``num_layers + 1`` for the rest
    (final norm, pooler, pretraining and task heads)."""
    block = _BLOCK.search(path)
    if block:
        return int(block.group(1)) + 1
    parts = path.split(".")
    if parts[0] == "backbone":
        parts = parts[1:]
    return 0 if parts and parts[0] in _EMBEDDINGS else num_layers + 1


def layerwise_decay(decay: float, num_layers: int) -> GradientTransformation:
    """Scales each update by ``decay ** (num_layers + 1 - layer_index(path))``: the head keeps the
    full learning rate, each block below gets ``decay`` times the one above (ELECTRA, BEiT).
    Chain it after the optimizer; with decoupled weight decay the decay is scaled alike, as
    per-group learning rates in ``torch.optim`` would."""
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"layerwise_decay: decay must be in (0, 1], got {decay}")

    def factor(path: str) -> float:
        return decay ** (num_layers + 1 - layer_index(path, num_layers))

    def update(updates: PyTree, state: EmptyState, params: PyTree = None, **_: Any) -> tuple:
        scaled = tree.map_with_path(lambda path, u: u * factor(path), updates)
        return scaled, state

    return GradientTransformation(lambda params: EmptyState(), update)


def count_trainable(params: PyTree, frozen: tuple[Pattern, ...] = ()) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts when the ``frozen`` patterns are frozen."""
    total = tree.size(params)
    return total - (tree.size(tree.select(params, *frozen)) if frozen else 0), total


def resize_vocab(model: Any, params: PyTree, vocab_size: int) -> tuple[Any, PyTree]:
    """A GPT with ``vocab_size`` token ids (e.g. the old ones and new special tokens) and its
    params: new embedding rows (and unembedding columns, when untied) are the mean of the old
    ones (Hewitt 2021), so the new tokens start where the model's tokens are on average and
    no key is needed; fewer ids drop the last rows. ``params`` is not changed."""
    if not isinstance(model, GPT):
        raise TypeError(f"resize_vocab: a GPT, got {type(model).__name__}")
    old = model.config.vocab_size
    if vocab_size < 1:
        raise ValueError(f"resize_vocab: vocab_size must be >= 1, got {vocab_size}")

    def resized(x: torch.Tensor, axis: int) -> torch.Tensor:
        if vocab_size <= old:
            return x.narrow(axis, 0, vocab_size).clone()
        mean = x.mean(dim=axis, keepdim=True)
        shape = list(x.shape)
        shape[axis] = vocab_size - old
        return torch.cat([x, mean.expand(shape)], dim=axis)

    out = {**params, "embed": {**params["embed"], "table": resized(params["embed"]["table"], 0)}}
    if not model.config.tie_embeddings:
        out["unembed"] = {**params["unembed"], "w": resized(params["unembed"]["w"], -1)}
    return GPT(dataclasses.replace(model.config, vocab_size=vocab_size)), out
