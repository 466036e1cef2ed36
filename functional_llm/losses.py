"""The cross-entropy family, and the task losses built on it.

Every loss returns ``(scalar, aux)``: the scalar to differentiate, and a dict of metrics
(tensors, detached) that the train step averages and reports.

:func:`cross_entropy` is the article's ``-sum_c y_c log softmax(z)_c``, averaged over the
*counted* targets (those not equal to ``ignore_index``), with two regularisers::

    lse    = log sum_c exp(z_c)
    nll    = lse - z_y                                        (one-hot y)
    smooth = (1 - eps) nll + eps (lse - mean_c z_c)           (label smoothing, torch's definition)
    loss   = sum_counted (smooth + z_loss lse^2) / n_counted  (z-loss: PaLM's logit drift penalty)

The task losses adapt a model to that: :func:`next_token` (causal LM), :func:`seq2seq`,
:func:`mlm`, :func:`nsp`, :func:`bert_pretraining` (MLM + NSP), :func:`classification`,
:func:`token_classification` and :func:`qa_span`. Each takes the model (and options) and
returns ``loss_fn(params, batch, key) -> (scalar, aux)``, the signature
:func:`functional_llm.train.make_step` composes; ``batch`` is a dict of tensors named below.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from functional_llm.models.inputs import check_range
from functional_llm.nn.dropout import inference
from functional_llm.types import IGNORE, Batch, LossFn, Metrics

__all__ = [
    "IGNORE",
    "LossFn",
    "bert_pretraining",
    "classification",
    "cross_entropy",
    "mlm",
    "next_token",
    "nsp",
    "qa_span",
    "seq2seq",
    "token_classification",
]


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = IGNORE,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Mean cross-entropy of ``logits: (..., C)`` against integer ``targets: (...)`` over the
    targets that are not ``ignore_index``; zero if none is counted. Float ``targets: (..., C)``
    are class probabilities (soft labels, a teacher's distribution): ``-sum_c p_c log q_c`` per
    position, averaged over every position.

    aux: ``loss`` (the returned value), ``nll`` (plain cross-entropy, no smoothing or z-loss),
    ``accuracy`` (argmax hits) and ``count`` (counted targets, the weight to average over
    micro-batches with).
    """
    if targets.dtype.is_floating_point and targets.shape == logits.shape:
        return _soft_cross_entropy(logits, targets)
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"cross_entropy: logits {tuple(logits.shape)} need targets of shape "
            f"{tuple(logits.shape[:-1])} (class ids) or {tuple(logits.shape)} (probabilities), "
            f"got {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point:
        raise TypeError(f"cross_entropy: targets must be integer class ids, got {targets.dtype}")
    check_range("cross_entropy targets", targets, logits.shape[-1], ignore=ignore_index)
    z = logits.flatten(0, -2)
    z = z if z.dtype in (torch.float32, torch.float64) else z.float()  # bf16/fp16 logits upcast
    y = targets.flatten()
    counted = y != ignore_index
    count = counted.sum()
    denominator = count.clamp(min=1).to(z.dtype)
    lse = _logsumexp(z)
    target = _target_logit(z, torch.where(counted, y, 0))
    nll = (lse - target) * counted
    per_token = nll
    if label_smoothing:
        uniform = (lse - z.mean(dim=-1)) * counted
        per_token = (1 - label_smoothing) * nll + label_smoothing * uniform
    if z_loss:
        per_token = per_token + z_loss * lse.square() * counted
    loss = per_token.sum() / denominator
    with torch.no_grad():
        # a hit: the target's logit is the largest (argmax, up to exact ties)
        hits = (target >= z.amax(dim=-1)) & counted
        aux = {
            "loss": loss.detach(),
            "nll": nll.sum().detach() / denominator,
            "accuracy": hits.sum() / denominator,
            "count": count,
        }
    return loss, aux


def _soft_cross_entropy(logits: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    per_position = -(probs.to(z.dtype) * torch.log_softmax(z, dim=-1)).sum(-1)
    loss = per_position.mean()
    with torch.no_grad():
        hits = (z.argmax(-1) == probs.argmax(-1)).float().mean()
        count = torch.tensor(per_position.numel(), device=z.device)
    return loss, {"loss": loss.detach(), "nll": loss.detach(), "accuracy": hits, "count": count}


def _is_dtensor(x: torch.Tensor) -> bool:
    """``isinstance(x, DTensor)`` without importing DTensor (a large import): no DTensor exists
    before its module has been loaded."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def _logsumexp(z: torch.Tensor) -> torch.Tensor:
    """``log sum_c exp z_c`` over the last dim. For a DTensor, as ``m + log sum exp(z - m)``
    with ``m = max_c z_c``: a max and a sum, which DTensor runs on logits sharded over the
    vocabulary (tensor parallel) with one all-reduce of a number per token each."""
    if not _is_dtensor(z):
        return torch.logsumexp(z, dim=-1)
    m = z.detach().amax(dim=-1, keepdim=True)
    return (m + (z - m).exp().sum(dim=-1, keepdim=True).log()).squeeze(-1)


def _target_logit(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z[i, y_i]``. A gather, except on a DTensor: there the logit is picked by a comparison
    with the class index and a sum over classes, which stays sharded over the vocabulary
    (the vocab-parallel cross-entropy of Megatron-LM, written in DTensor's ops)."""
    if not _is_dtensor(z):
        return z.gather(-1, y[:, None]).squeeze(-1)
    classes = torch.arange(z.shape[-1], device=y.device)
    return torch.where(classes == y[:, None], z, 0.0).sum(dim=-1)


def _ce_options(ignore_index: int, label_smoothing: float, z_loss: float) -> dict[str, Any]:
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    return {"ignore_index": ignore_index, "label_smoothing": label_smoothing, "z_loss": z_loss}


def _require(batch: Batch, loss: str, *names: str) -> None:
    missing = [n for n in names if n not in batch]
    if missing:
        raise KeyError(f"{loss} loss: the batch has no {missing}; it has {sorted(batch)}")


def next_token(
    model: Any,
    *,
    ignore_index: int = IGNORE,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> LossFn:
    """Causal LM: predict ``targets[t]`` from ``inputs[:t+1]``.

    batch: ``inputs`` and ``targets`` ``(B, T)`` (targets are inputs shifted by one), or
    ``tokens`` ``(B, T+1)`` to be split so; optional ``valid`` ``(B, T)`` hides padding (pad
    targets should be ``ignore_index``); optional ``positions`` and ``segments`` ``(B, T)``
    describe packed rows (:func:`functional_llm.data.chat.pack`) for a GPT.
    """
    options = _ce_options(ignore_index, label_smoothing, z_loss)
    pick = _by_key(model)

    def loss_fn(params: Any, batch: Batch, key: torch.Tensor | None = None) -> Any:
        if "tokens" in batch:
            inputs, targets = batch["tokens"][..., :-1], batch["tokens"][..., 1:]
        else:
            _require(batch, "next_token", "inputs", "targets")
            inputs, targets = batch["inputs"], batch["targets"]
        packed = {k: batch[k] for k in ("positions", "segments") if k in batch}
        logits = pick(key).apply(params, inputs, valid=batch.get("valid"), key=key, **packed)
        return cross_entropy(logits, targets, **options)

    return loss_fn


def seq2seq(
    model: Any, *, ignore_index: int = IGNORE, label_smoothing: float = 0.0, z_loss: float = 0.0
) -> LossFn:
    """Encoder-decoder (translation, summarisation): predict ``tgt_out`` from the source and
    ``tgt_in`` (the target shifted right, starting with BOS).

    batch: ``src`` ``(B, S)``, ``tgt_in`` and ``tgt_out`` ``(B, T)``; optional ``src_valid``,
    ``tgt_valid``.
    """
    options = _ce_options(ignore_index, label_smoothing, z_loss)
    pick = _by_key(model)

    def loss_fn(params: Any, batch: Batch, key: torch.Tensor | None = None) -> Any:
        _require(batch, "seq2seq", "src", "tgt_in", "tgt_out")
        logits = pick(key).apply(
            params,
            batch["src"],
            batch["tgt_in"],
            src_valid=batch.get("src_valid"),
            tgt_valid=batch.get("tgt_valid"),
            key=key,
        )
        return cross_entropy(logits, batch["tgt_out"], **options)

    return loss_fn


def _mlm_from_hidden(model: Any, params: Any, hidden: torch.Tensor, batch: Batch) -> Any:
    """MLM cross-entropy. With ``mlm_positions`` ``(B, P)`` in the batch (BERT's
    ``max_predictions_per_seq`` layout; ``labels`` then ``(B, P)``, padded with ``IGNORE``) the
    vocabulary projection, BERT's costliest matmul, runs on those ``P`` positions only; shapes
    stay static, so a compiled step does not recompile."""
    if "mlm_positions" in batch:
        index = batch["mlm_positions"][..., None].expand(-1, -1, hidden.shape[-1])
        hidden = hidden.gather(-2, index)
    return cross_entropy(model.mlm_logits(params, hidden), batch["labels"])


def mlm(model: Any) -> LossFn:
    """Masked LM (BERT): predict the original token at each masked position.

    batch: ``tokens`` ``(B, T)`` (already masked), ``labels`` ``(B, T)`` with the original id at
    masked positions and ``IGNORE`` elsewhere (or ``(B, P)`` with ``mlm_positions``, see
    :func:`_mlm_from_hidden`); optional ``valid`` and ``token_types``.
    """
    pick = _by_key(model)

    def loss_fn(params: Any, batch: Batch, key: torch.Tensor | None = None) -> Any:
        _require(batch, "mlm", "tokens", "labels")
        out = _on_tokens(pick(key), params, batch, key)
        return _mlm_from_hidden(model, params, out.hidden, batch)

    return loss_fn


def nsp(model: Any) -> LossFn:
    """Next-sentence prediction (BERT): ``nsp_label`` ``(B,)`` is 0 when segment B follows
    segment A, 1 when it is random. batch: ``tokens``, ``token_types``, ``nsp_label``."""
    pick = _by_key(model)

    def loss_fn(params: Any, batch: Batch, key: torch.Tensor | None = None) -> Any:
        _require(batch, "nsp", "tokens", "token_types", "nsp_label")
        out = _on_tokens(pick(key), params, batch, key)
        return cross_entropy(model.nsp_logits(params, out.pooled), batch["nsp_label"])

    return loss_fn


def bert_pretraining(model: Any, nsp_weight: float = 1.0) -> LossFn:
    """BERT's pretraining objective, MLM + ``nsp_weight`` NSP, from one encoder pass.
    aux: ``mlm_*`` and ``nsp_*`` metrics and the total ``loss``."""
    pick = _by_key(model)

    def loss_fn(params: Any, batch: Batch, key: torch.Tensor | None = None) -> Any:
        _require(batch, "bert_pretraining", "tokens", "token_types", "labels", "nsp_label")
        out = _on_tokens(pick(key), params, batch, key)
        mlm_loss, mlm_aux = _mlm_from_hidden(model, params, out.hidden, batch)
        nsp_loss, nsp_aux = cross_entropy(model.nsp_logits(params, out.pooled), batch["nsp_label"])
        loss = mlm_loss + nsp_weight * nsp_loss
        aux = {f"mlm_{k}": v for k, v in mlm_aux.items()}
        aux.update({f"nsp_{k}": v for k, v in nsp_aux.items()})
        aux["loss"] = loss.detach()
        return loss, aux

    return loss_fn


def classification(model: Any, *, label_smoothing: float = 0.0) -> LossFn:
    """Sequence classification (:class:`~functional_llm.models.SequenceClassifier`).
    batch: ``tokens``, ``label`` ``(B,)``; optional ``valid``, ``token_types``."""
    options = _ce_options(IGNORE, label_smoothing, 0.0)
    pick = _by_key(model)

    def loss_fn(params: Any, batch: Batch, key: torch.Tensor | None = None) -> Any:
        _require(batch, "classification", "tokens", "label")
        logits = _on_tokens(pick(key), params, batch, key)
        return cross_entropy(logits, batch["label"], **options)

    return loss_fn


def token_classification(model: Any) -> LossFn:
    """Sequence labelling (:class:`~functional_llm.models.TokenClassifier`): one label per token,
    ``IGNORE`` on padding, special tokens and non-first sub-words. batch: ``tokens``,
    ``labels`` ``(B, T)``; optional ``valid``, ``token_types``."""
    pick = _by_key(model)

    def loss_fn(params: Any, batch: Batch, key: torch.Tensor | None = None) -> Any:
        _require(batch, "token_classification", "tokens", "labels")
        logits = _on_tokens(pick(key), params, batch, key)
        return cross_entropy(logits, batch["labels"])

    return loss_fn


def qa_span(model: Any) -> LossFn:
    """Extractive QA (:class:`~functional_llm.models.ExtractiveQA`): the mean of the start and
    end cross-entropies over token positions; an unanswerable question points both at
    position 0 ([CLS]), as in BERT's SQuAD 2.0 recipe. batch: ``tokens``, ``start``, ``end``
    ``(B,)``; optional ``valid``, ``token_types``. aux also has ``exact`` (both ends right)."""
    pick = _by_key(model)

    def loss_fn(params: Any, batch: Batch, key: torch.Tensor | None = None) -> Any:
        _require(batch, "qa_span", "tokens", "start", "end")
        spans = _on_tokens(pick(key), params, batch, key)
        start_loss, start_aux = cross_entropy(spans.start, batch["start"])
        end_loss, end_aux = cross_entropy(spans.end, batch["end"])
        loss = (start_loss + end_loss) / 2
        with torch.no_grad():
            exact = (spans.start.argmax(-1) == batch["start"]) & (
                spans.end.argmax(-1) == batch["end"]
            )
        aux = {
            "loss": loss.detach(),
            "start_accuracy": start_aux["accuracy"],
            "end_accuracy": end_aux["accuracy"],
            "exact": exact.float().mean(),
            "count": start_aux["count"],
        }
        return loss, aux

    return loss_fn


def _by_key(model: Any) -> Callable[[torch.Tensor | None], Any]:
    """``pick(key)``: ``model`` to train (the key drives its dropout), or without a key, which
    is how :func:`~functional_llm.train.make_eval_step` evaluates, the same model with every
    dropout rate 0 (:func:`functional_llm.nn.inference`, resolved once, here)."""
    evaluation = inference(model)
    return lambda key: model if key is not None else evaluation


def _on_tokens(model: Any, params: Any, batch: Batch, key: torch.Tensor | None) -> Any:
    """The model on ``batch["tokens"]`` with the batch's ``valid`` and ``token_types`` (segment
    ids), when it has them: BERT, and the task heads on either backbone."""
    types = {"token_types": batch["token_types"]} if "token_types" in batch else {}
    return model.apply(params, batch["tokens"], valid=batch.get("valid"), key=key, **types)
