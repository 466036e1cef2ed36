"""Extractive question answering data: SQuAD v1.1 / v2.0 JSON, windows over long contexts, and
answers mapped from token scores back to text.

    examples = read_squad("dev-v2.0.json")
    features = qa_features(tokenizer, examples, max_length=384, doc_stride=128)
    answers = predict_answers(examples, features, start_logits, end_logits)   # {id: text}

A feature is ``[CLS] question [SEP] context-window [SEP]``. A context longer than the window is
covered by several windows, ``doc_stride`` tokens apart (BERT's ``run_squad``), so every
answer lies whole inside at least one window. Training targets are token positions; a question
with no answer in a window (unanswerable, or its answer outside the window) points at [CLS],
position 0. At prediction time every window of an example votes: the best-scoring span
``start_logit + end_logit`` over all windows wins, unless the no-answer score (``[CLS]``'s,
lowest over the windows) beats it by ``null_threshold``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from functional_llm.data.reading import DataError, field, read_json
from functional_llm.data.subword import SubwordTokenizer

__all__ = ["QAExample", "predict_answers", "qa_features", "read_squad", "token_span"]


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    context: str
    answers: tuple[str, ...]  # every annotator's answer text (empty when unanswerable)
    starts: tuple[int, ...]  # their character offsets in the context
    impossible: bool = False
    article: int = 0  # index of its article in the file (to split a file by article)


def read_squad(path: str | os.PathLike) -> list[QAExample]:
    """Every question of a SQuAD v1.1 or v2.0 file, in file order.

    Checked as it is read, each error naming the file and the item: every field SQuAD
    defines must be present; a question is unanswerable only when it says so
    (``is_impossible``), so an answerable one needs answers; and every answer's text must be
    the context's text at its ``answer_start`` (a shifted offset would train on a wrong span).
    """
    data = read_json(path)
    if not isinstance(data, dict) or "data" not in data:
        raise DataError(f"{path}: not a SQuAD file (no top-level 'data')")
    out = []
    for index, article in enumerate(field(data, "data", f"{path}", list)):
        where_a = f"{path}: data[{index}]"
        for j, paragraph in enumerate(field(article, "paragraphs", where_a, list)):
            where_p = f"{where_a}.paragraphs[{j}]"
            context = field(paragraph, "context", where_p, str)
            for k, qa in enumerate(field(paragraph, "qas", where_p, list)):
                where = f"{where_p}.qas[{k}]"
                qid = field(qa, "id", where, (str, int))
                question = field(qa, "question", where, str)
                impossible = bool(qa.get("is_impossible", False)) if isinstance(qa, dict) else False
                answers = [] if impossible and "answers" not in qa else field(
                    qa, "answers", f"{where} (id {qid})", list
                )  # fmt: skip
                if not impossible and not answers:
                    raise DataError(
                        f'{where} (id {qid}): no answers, and it does not say "is_impossible": true'
                    )
                texts, starts = [], []
                for n, answer in enumerate(answers):
                    where_n = f"{where}.answers[{n}] (id {qid})"
                    text = field(answer, "text", where_n, str)
                    start = field(answer, "answer_start", where_n, int)
                    if context[start : start + len(text)] != text:
                        found = context[max(start, 0) : start + len(text)]
                        raise DataError(
                            f"{where_n}: the answer {text!r} is not at answer_start {start} of "
                            f"its context (which has {found!r} there; {len(context)} characters)"
                        )
                    texts.append(text)
                    starts.append(start)
                out.append(
                    QAExample(
                        id=str(qid),
                        question=question,
                        context=context,
                        answers=tuple(texts),
                        starts=tuple(starts),
                        impossible=impossible,
                        article=index,
                    )
                )
    return out


def token_span(offsets: np.ndarray, char_start: int, char_end: int) -> tuple[int, int] | None:
    """The first and last token (rows of ``offsets``, ``(n, 2)`` character spans) that overlap
    ``[char_start, char_end)``, or None when no token does."""
    overlap = (offsets[:, 0] < char_end) & (offsets[:, 1] > char_start)
    if not overlap.any():
        return None
    hits = np.flatnonzero(overlap)
    return int(hits[0]), int(hits[-1])


def qa_features(
    tokenizer: SubwordTokenizer,
    examples: Sequence[QAExample],
    max_length: int = 384,
    doc_stride: int = 128,
    max_query: int = 64,
) -> list[dict[str, Any]]:
    """Model inputs per context window: ``tokens``, ``token_types``, ``start``/``end`` (the
    first answer's token span, or 0 for none), and for :func:`predict_answers`
    ``example_index`` and ``offsets`` (context character spans; ``-1`` outside the context)."""
    if doc_stride < 1 or max_query < 1:
        raise ValueError(
            f"qa_features: doc_stride ({doc_stride}) and max_query ({max_query}) must be >= 1"
        )
    features = []
    for index, ex in enumerate(examples):
        question = tokenizer.tokenize(ex.question).take(slice(0, max_query))
        context = tokenizer.tokenize(ex.context, segment=1)
        budget = max_length - len(question) - 3
        if budget <= 0:
            raise ValueError(f"max_length {max_length} leaves no room for the context")
        head = np.concatenate([[tokenizer.id_of("cls")], question.ids, [tokenizer.id_of("sep")]])
        answer = None
        if not ex.impossible:
            answer = token_span(context.offsets, ex.starts[0], ex.starts[0] + len(ex.answers[0]))
        first = 0
        while True:
            last = min(first + budget, len(context))
            window = context.take(slice(first, last))
            ids = np.concatenate([head, window.ids, [tokenizer.id_of("sep")]])
            offsets = np.full((len(ids), 2), -1, dtype=np.int64)
            offsets[len(head) : len(head) + len(window)] = window.offsets
            start = end = 0
            if answer is not None and first <= answer[0] and answer[1] < last:
                start, end = answer[0] - first + len(head), answer[1] - first + len(head)
            features.append(
                {
                    "tokens": ids,
                    "token_types": (np.arange(len(ids)) >= len(head)).astype(np.int64),
                    "start": start,
                    "end": end,
                    "example_index": index,
                    "offsets": offsets,
                }
            )
            if last >= len(context):
                break
            first += doc_stride
    return features


def predict_answers(
    examples: Sequence[QAExample],
    features: Sequence[dict[str, Any]],
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    *,
    max_answer_tokens: int = 30,
    n_best: int = 20,
    null_threshold: float | None = 0.0,
) -> dict[str, str]:
    """The answer text per example id: the best span ``s_i + e_j`` (``i <= j``, at most
    ``max_answer_tokens``, both in the context) among each window's ``n_best`` starts and ends;
    ``""`` when ``null_threshold`` is set (SQuAD 2.0) and ``s_0 + e_0`` exceeds the best span's
    score by more than it. ``null_threshold=None`` always answers (SQuAD 1.1)."""
    best: dict[int, tuple[float, str]] = {}
    null: dict[int, float] = {}
    for feature, s, e in zip(features, start_logits, end_logits, strict=True):
        index, offsets = feature["example_index"], feature["offsets"]
        s, e = np.asarray(s, dtype=np.float64), np.asarray(e, dtype=np.float64)
        null[index] = min(null.get(index, np.inf), s[0] + e[0])
        in_context = offsets[: len(s), 0] >= 0
        starts = [i for i in np.argsort(-s)[:n_best] if i < len(offsets) and in_context[i]]
        ends = [j for j in np.argsort(-e)[:n_best] if j < len(offsets) and in_context[j]]
        for i in starts:
            for j in ends:
                if i <= j < i + max_answer_tokens and s[i] + e[j] > best.get(index, (-np.inf,))[0]:
                    text = examples[index].context[offsets[i, 0] : offsets[j, 1]]
                    best[index] = (float(s[i] + e[j]), text)
    out = {}
    for index, ex in enumerate(examples):
        score, text = best.get(index, (-np.inf, ""))
        if null_threshold is not None and null.get(index, np.inf) - score > null_threshold:
            text = ""
        out[ex.id] = text
    return out
