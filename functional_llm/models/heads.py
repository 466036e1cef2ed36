"""Fine-tuning heads on a backbone (:class:`~functional_llm.models.BERT` or
:class:`~functional_llm.models.GPT`): sequence classification, token classification
(sequence labelling) and extractive question answering.

Params are ``{"backbone": ..., "head": ...}``, so a pretrained backbone's params drop in and a
fresh head is trained beside them (``tree.partition`` to freeze one part). A backbone provides
``hidden_states(params, tokens, valid=, key=, ...)`` and ``pool(params, h, valid)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from functional_llm.init import Normal
from functional_llm.nn import Linear, dropout
from functional_llm.nn.module import Layer, Params, axes_of, init_all, maybe_split
from functional_llm.types import Backbone

__all__ = ["ExtractiveQA", "SequenceClassifier", "SpanLogits", "TokenClassifier"]

Key = torch.Tensor | None


@dataclass(frozen=True)
class _Head(Layer):
    backbone: Backbone
    _: KW_ONLY
    num_labels: int
    dropout: float = 0.0
    # Each head defines ``_output(params, h, valid, key)``: the backbone's states to its output.
    _output: ClassVar[Callable[..., Any]]

    def __post_init__(self) -> None:
        if self.num_labels <= 0:
            raise ValueError(
                f"{type(self).__name__}.num_labels must be positive, got {self.num_labels}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{type(self).__name__}.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head(self) -> Linear:
        c = self.backbone.config
        return Linear(
            in_dims=c.d_model,
            out_dims=self.num_labels,
            bias=True,
            in_axes=("embed",),
            out_axes=(None,),
            w_init=Normal(c.init_std),
            dtype=c.dtype,
        )

    def init(self, key: torch.Tensor) -> Params:
        return init_all({"backbone": self.backbone, "head": self.head}, key)

    def axes(self) -> Params:
        return axes_of({"backbone": self.backbone, "head": self.head})

    def apply(
        self,
        params: Params,
        tokens: torch.Tensor,
        *,
        valid: torch.Tensor | None = None,
        key: torch.Tensor | None = None,
        **kw: Any,
    ) -> Any:
        """Backbone features of ``tokens: (..., T)``, then the head; ``kw`` goes to the backbone
        (e.g. BERT's ``token_types``), ``key`` turns dropout on."""
        k_backbone, k_head = maybe_split(key)
        h = self.backbone.hidden_states(
            params["backbone"], tokens, valid=valid, key=k_backbone, **kw
        )
        return self._output(params, h, valid, k_head)


@dataclass(frozen=True)
class SequenceClassifier(_Head):
    """One label per sequence, ``(..., num_labels)`` logits: ``W dropout(pool(h)) + b``.

    ``pooling="backbone"``: the backbone's own (BERT's [CLS] pooler, GPT's last real token).
    ``pooling="mean"``: ``sum_t valid_t h_t / sum_t valid_t``, the mean of the real tokens'
    states (Sentence-BERT's choice), which a backbone pretrained by masked-LM alone has trained
    at every position, where its [CLS] state and pooler learnt nothing without NSP."""

    pooling: str = "backbone"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pooling not in ("backbone", "mean"):
            raise ValueError(
                f"SequenceClassifier.pooling must be 'backbone' or 'mean', got {self.pooling!r}"
            )

    def _output(
        self, params: Params, h: torch.Tensor, valid: torch.Tensor | None, key: Key
    ) -> torch.Tensor:
        if self.pooling == "backbone":
            pooled = self.backbone.pool(params["backbone"], h, valid)
        elif valid is None:
            pooled = h.mean(dim=-2)
        else:
            weight = valid.to(h.dtype)[..., None]
            pooled = (h * weight).sum(dim=-2) / weight.sum(dim=-2).clamp_min(1)
        return self.head.apply(params["head"], dropout(pooled, self.dropout, key=key))


@dataclass(frozen=True)
class TokenClassifier(_Head):
    """One label per token (sequence labelling, e.g. BIO tags), ``(..., T, num_labels)`` logits:
    ``W dropout(h_t) + b``."""

    def _output(
        self, params: Params, h: torch.Tensor, valid: torch.Tensor | None, key: Key
    ) -> torch.Tensor:
        return self.head.apply(params["head"], dropout(h, self.dropout, key=key))


class SpanLogits(NamedTuple):
    start: torch.Tensor  # (..., T) score of each token starting the answer
    end: torch.Tensor  # (..., T) score of each token ending it


@dataclass(frozen=True)
class ExtractiveQA(_Head):
    """Answer-span scores (SQuAD): a ``(d_model, 2)`` projection gives start and end logits;
    padded tokens score ``-inf`` so they are never chosen."""

    num_labels: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_labels != 2:
            raise ValueError(f"ExtractiveQA.num_labels is 2 (start, end), got {self.num_labels}")

    def _output(
        self, params: Params, h: torch.Tensor, valid: torch.Tensor | None, key: Key
    ) -> SpanLogits:
        logits = self.head.apply(params["head"], dropout(h, self.dropout, key=key))
        if valid is not None:
            logits = logits.masked_fill(~valid.bool()[..., None], float("-inf"))
        return SpanLogits(logits[..., 0], logits[..., 1])
