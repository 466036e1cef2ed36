"""Lenses: each layer's residual stream read out as if it were the last.

Logit lens (nostalgebraist 2020), through the model's own final norm and unembedding:

    logits_l = readout(h_l),   h_0 = the first block's input,  h_l = block_l(h_{l-1})

Tuned lens (Belrose et al. 2023): one affine translator per layer, fitted so that its readout
matches the model's final distribution,

    logits_l = readout(h_l + A_l h_l + b_l),   min_{A, b} sum_l KL(p_L || softmax(logits_l)),

with ``A_l = 0, b_l = 0`` at the start (the logit lens) and the last layer left as it is.

``readout`` is a GPT's final norm and unembedding, BERT's masked-LM head, or the encoder-
decoder's decoder norm and output projection. Results are ``(n_layers + 1, ..., vocab)``; the
last entry equals the model's own logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from functional_llm import models, optim, train, tree
from functional_llm.interpret.intermediates import hidden_states, n_layers
from functional_llm.types import Params

__all__ = ["fit_tuned_lens", "init_tuned_lens", "logit_lens", "readout", "tuned_lens"]


def readout(model: Any, params: Params, h: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits of residual-stream states ``h: (..., d_model)`` through the model's
    last pieces: a GPT's final norm and unembedding, BERT's MLM head, or the encoder-decoder's
    decoder norm and output projection."""
    if isinstance(model, models.GPT):
        return model.logits(params, model.stack.finish(params, h))
    if isinstance(model, models.BERT):
        return model.mlm_logits(params, model.stack.finish(params, h))
    _check_family(model, "readout")
    if model.config.copy_source:
        raise ValueError(
            "readout: a copy_source model's output also copies from the source through its "
            "copy head, which a lens over the decoder states lacks"
        )
    return model.logits(params, model.core.decoder.finish(params["decoder"], h))


def _check_family(model: Any, name: str) -> None:
    if not isinstance(model, models.GPT | models.BERT | models.Transformer):
        raise TypeError(f"{name}: reads a GPT, a BERT or a Transformer out through its "
                        f"vocabulary; got {type(model).__name__}")  # fmt: skip


def _check(model: Any, name: str, kwargs: dict[str, Any]) -> None:
    _check_family(model, name)
    if getattr(model.config, "dropout", 0.0):
        raise ValueError(f"{name}: evaluate fl.nn.inference(model), without dropout")
    if kwargs.get("stack") not in (None, "decoder"):
        raise ValueError(f"{name}: only the decoder's states read out through the vocabulary, "
                         f"not stack={kwargs['stack']!r}")  # fmt: skip


def logit_lens(model: Any, params: Params, *inputs: Any, **kwargs: Any) -> torch.Tensor:
    """``(n_layers + 1, ..., T, vocab)``: every layer's state through :func:`readout`.
    ``*inputs, **kwargs`` are ``model.apply``'s (a GPT's tokens, BERT's tokens, the
    encoder-decoder's source and target)."""
    _check(model, "logit_lens", kwargs)
    states = hidden_states(model, params, *inputs, **kwargs)
    return torch.stack([readout(model, params, h) for h in states])


def init_tuned_lens(model: Any, params: Params) -> Params:
    """Translators that start as the identity: ``{"weight": (L, d, d), "bias": (L, d)}`` zeros
    for the states before the last (``L`` = the number of blocks; the decoder's, for the
    encoder-decoder)."""
    like = tree.leaves(params)[0]
    d, n = model.config.d_model, n_layers(params)
    return {
        "weight": torch.zeros(n, d, d, dtype=like.dtype, device=like.device),
        "bias": torch.zeros(n, d, dtype=like.dtype, device=like.device),
    }


def _translated(lens: Params, states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    moved = [h + h @ lens["weight"][i].T + lens["bias"][i] for i, h in enumerate(states[:-1])]
    return [*moved, states[-1]]


def tuned_lens(
    model: Any, params: Params, lens: Params, *inputs: Any, **kwargs: Any
) -> torch.Tensor:
    """``(n_layers + 1, ..., T, vocab)``: each state through its translator, then
    :func:`readout` (the last state untranslated: the model's logits)."""
    _check(model, "tuned_lens", kwargs)
    _check_lens(model, params, lens)
    states = hidden_states(model, params, *inputs, **kwargs)
    return torch.stack([readout(model, params, h) for h in _translated(lens, states)])


def _check_lens(model: Any, params: Params, lens: Params) -> None:
    d, n = model.config.d_model, n_layers(params)
    if tuple(lens["weight"].shape) != (n, d, d) or tuple(lens["bias"].shape) != (n, d):
        raise ValueError(
            f"lens: weight {tuple(lens['weight'].shape)} and bias {tuple(lens['bias'].shape)} "
            f"do not fit a model of {n} layers and width {d}: expected {(n, d, d)} and {(n, d)}"
        )


def lens_loss(
    model: Any, params: Params, lens: Params, states: Sequence[torch.Tensor], weight: torch.Tensor
) -> torch.Tensor:
    """``sum_l KL(p_L || p_l)`` averaged over the tokens where ``weight`` (``(..., T)``) is 1."""
    final = torch.log_softmax(readout(model, params, states[-1]).float(), -1)
    total = torch.zeros((), dtype=final.dtype, device=final.device)
    for h in _translated(lens, states)[:-1]:
        logp = torch.log_softmax(readout(model, params, h).float(), -1)
        kl = (final.exp() * (final - logp)).sum(-1)
        total = total + (kl * weight).sum() / weight.sum()
    return total


def fit_tuned_lens(
    model: Any,
    params: Params,
    batches: Iterable[tuple[tuple[Any, ...], dict[str, Any]]],
    *,
    optimizer: optim.GradientTransformation | None = None,
    lens: Params | None = None,
    weight: Callable[..., torch.Tensor] | None = None,
) -> tuple[Params, list[float]]:
    """Fit the translators on ``batches`` of ``(inputs, kwargs)`` for ``model.apply`` (one
    optimizer step each; the model is frozen). Returns the lens and the loss before each step.

    ``optimizer`` defaults to ``optim.adam(1e-3)``; ``weight(*inputs, **kwargs) -> (..., T)``
    says which positions count (by default the ``valid`` keyword where given, else all).
    """
    _check(model, "fit_tuned_lens", {})
    opt = optimizer or optim.adam(1e-3)
    fitted: Params = init_tuned_lens(model, params) if lens is None else lens
    _check_lens(model, params, fitted)
    state = opt.init(fitted)
    step = train.value_and_grad(
        lambda lens, states, w: (lens_loss(model, params, lens, states, w), None)
    )
    losses = []
    for inputs, kwargs in batches:
        with torch.no_grad():
            states = hidden_states(model, params, *inputs, **kwargs)
        (loss, _), grads = step(fitted, states, _weight(weight, states[0], inputs, kwargs))
        fitted, state = optim.update_and_apply(opt, fitted, grads, state)
        losses.append(float(loss))
    return fitted, losses


def _weight(
    weight: Callable[..., torch.Tensor] | None,
    h: torch.Tensor,
    inputs: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> torch.Tensor:
    if weight is not None:
        return weight(*inputs, **kwargs).to(h.dtype)
    valid = kwargs.get("valid", kwargs.get("tgt_valid"))
    return torch.ones(h.shape[:-1], dtype=h.dtype) if valid is None else valid.to(h.dtype)
