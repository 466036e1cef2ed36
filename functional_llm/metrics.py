"""Evaluation metrics with their reference definitions.

* :func:`accuracy`, :func:`macro_f1` (scikit-learn's ``f1_score(average="macro")``: the
  unweighted mean of per-class ``F1 = 2PR / (P + R)`` over the classes that occur in the gold
  labels or the predictions; 0 for a class with no true positives).
* :func:`entities` and :func:`entity_scores`: entity-level micro precision / recall / F1 as
  ``seqeval`` (and CoNLL's ``conlleval``) compute them: an entity counts only when its type,
  start and end all match. Chunks are read leniently, as conlleval does: an ``I-`` that follows
  ``O`` or another type starts an entity.
* :func:`squad_scores`: SQuAD's official exact match and F1 (v2.0 script): answers are
  normalised (lower case, punctuation and the articles a / an / the removed, whitespace
  collapsed); F1 is the bag-of-tokens overlap; each question takes its best gold answer; an
  unanswerable question scores 1 only for the empty prediction. Reported in percent, overall
  and split into ``HasAns`` / ``NoAns``.
* :func:`perplexity`: ``exp(mean negative log-likelihood per token)``.
* :func:`bleu` and :func:`chrf`: corpus BLEU and chrF by ``sacrebleu``, the field's reference
  implementation (its default tokenisation; the signature string says exactly how), and
  :func:`rouge`: ROUGE-1/2/L F-measures by Google's ``rouge-score`` (Porter stemming), the
  implementation summarisation papers report. Both are optional dependencies (the ``text``
  extra), imported when called.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "accuracy",
    "bleu",
    "chrf",
    "entities",
    "entity_scores",
    "exact_match",
    "is_entity_tag",
    "macro_f1",
    "normalize_answer",
    "perplexity",
    "rouge",
    "squad_f1",
    "squad_scores",
]


def _check_same_length(a: Sequence, b: Sequence, what: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{what}: {len(a)} predictions for {len(b)} gold labels")


def accuracy(predictions: Sequence[Any], labels: Sequence[Any]) -> float:
    """The fraction of predictions equal to their label."""
    _check_same_length(predictions, labels, "accuracy")
    if not labels:
        raise ValueError("accuracy of no examples")
    return sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels)


def _f1(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def macro_f1(predictions: Sequence[Any], labels: Sequence[Any]) -> float:
    """The mean per-class F1 over every class seen in ``labels`` or ``predictions``."""
    _check_same_length(predictions, labels, "macro_f1")
    classes = sorted(set(labels) | set(predictions), key=repr)
    if not classes:
        raise ValueError("macro_f1 of no examples")
    scores = []
    for c in classes:
        tp = sum(p == c and y == c for p, y in zip(predictions, labels, strict=True))
        scores.append(_f1(tp, sum(p == c for p in predictions), sum(y == c for y in labels))[2])
    return sum(scores) / len(scores)


def _parts(tag: str) -> tuple[str, str]:
    if tag in ("O", ""):
        return "O", ""
    prefix, _, kind = tag.partition("-")
    return prefix, kind or "_"


def _ends(prev: str, prev_kind: str, tag: str, kind: str) -> bool:
    """Whether the chunk open at the previous tag ends before this one (conlleval)."""
    return (
        prev in ("E", "S")
        or (prev in ("B", "I") and tag in ("B", "S", "O"))
        or (prev != "O" and prev_kind != kind)
    )


def _starts(prev: str, prev_kind: str, tag: str, kind: str) -> bool:
    """Whether a chunk starts at this tag (conlleval)."""
    return (
        tag in ("B", "S")
        or (prev in ("E", "S", "O") and tag in ("I", "E"))
        or (tag != "O" and prev_kind != kind)
    )


_SCHEME = ("B", "I", "E", "S", "O")  # the prefixes of BIO and BIOES


def is_entity_tag(tag: str) -> bool:
    """Whether ``tag`` belongs to BIO/BIOES: ``O`` (or empty), or ``B-``, ``I-``, ``E-``,
    ``S-`` with or without a type."""
    return _parts(tag)[0] in _SCHEME


def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The ``(type, first, last)`` chunks of a BIO or BIOES tag sequence (inclusive ends),
    as seqeval's and conlleval's ``get_entities`` find them. A tag with another prefix (``X``,
    ``.``) is an error naming it and its position: seqeval chunks those by accident (an ``O``
    has type ``_`` there, so an untyped ``X`` chunk never closes) and warns."""
    found, prev, prev_kind, begin = [], "O", "", 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, kind = _parts(tag)
        if prefix not in _SCHEME:
            raise ValueError(
                f"entities: tag {tag!r} at position {i} is not O or B-, I-, E-, S- (BIO/BIOES)"
            )
        if _ends(prev, prev_kind, prefix, kind):
            found.append((prev_kind, begin, i - 1))
        if _starts(prev, prev_kind, prefix, kind):
            begin = i
        prev, prev_kind = prefix, kind
    return found


def entity_scores(
    predictions: Sequence[Sequence[str]], labels: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Micro ``precision``, ``recall`` and ``f1`` over the entities of every sentence."""
    _check_same_length(predictions, labels, "entity_scores")
    tp = n_pred = n_gold = 0
    for pred, gold in zip(predictions, labels, strict=True):
        _check_same_length(pred, gold, "entity_scores (one sentence)")
        p, g = set(entities(pred)), set(entities(gold))
        tp, n_pred, n_gold = tp + len(p & g), n_pred + len(p), n_gold + len(g)
    precision, recall, f1 = _f1(tp, n_pred, n_gold)
    return {"precision": precision, "recall": recall, "f1": f1}


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised answers; 1 or 0 when either is empty."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    return _f1(common, len(pred), len(ref))[2]


def squad_scores(examples: Iterable[Any], predictions: Mapping[str, str]) -> dict[str, float]:
    """``exact`` and ``f1`` in percent over ``examples`` (with ``id`` and ``answers``; no
    answers means unanswerable), and the same for the ``HasAns`` / ``NoAns`` subsets."""
    groups: dict[str, list[tuple[float, float]]] = {"all": [], "HasAns": [], "NoAns": []}
    for ex in examples:
        if ex.id not in predictions:
            raise KeyError(f"no prediction for question {ex.id!r}")
        gold = [a for a in ex.answers if normalize_answer(a)] or [""]
        pred = predictions[ex.id]
        score = (max(exact_match(pred, g) for g in gold), max(squad_f1(pred, g) for g in gold))
        groups["all"].append(score)
        groups["HasAns" if ex.answers else "NoAns"].append(score)
    if not groups["all"]:
        raise ValueError("squad_scores of no examples")
    out = {}
    for name, scores in groups.items():
        if scores:
            prefix = "" if name == "all" else f"{name}_"
            out[f"{prefix}exact"] = 100 * sum(s[0] for s in scores) / len(scores)
            out[f"{prefix}f1"] = 100 * sum(s[1] for s in scores) / len(scores)
            out[f"{prefix}total"] = len(scores)
    return out


def perplexity(mean_nll: float) -> float:
    """``exp`` of the mean per-token negative log-likelihood (in nats)."""
    return math.exp(mean_nll)


def _text_metric(module: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ImportError(
            f"this metric needs {module.split('.')[0]}: pip install 'functional_llm[text]'"
        ) from None


def _pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"give one reference per hypothesis (got {len(hypotheses)} "
                         f"hypotheses and {len(references)} references), at least one")  # fmt: skip


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Corpus BLEU (0..100) and its sacrebleu signature, one reference per hypothesis."""
    _pairs(hypotheses, references)
    metric = _text_metric("sacrebleu.metrics").BLEU()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return {"bleu": float(score.score), "signature": str(metric.get_signature())}


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Corpus chrF (0..100) and its sacrebleu signature."""
    _pairs(hypotheses, references)
    metric = _text_metric("sacrebleu.metrics").CHRF()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return {"chrf": float(score.score), "signature": str(metric.get_signature())}


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures (0..100) over the pairs."""
    _pairs(hypotheses, references)
    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = _text_metric("rouge_score.rouge_scorer").RougeScorer(list(kinds), use_stemmer=True)
    scores = [scorer.score(r, h) for h, r in zip(hypotheses, references, strict=True)]
    return {k: 100.0 * sum(s[k].fmeasure for s in scores) / len(scores) for k in kinds}
