"""Beam search: the ``num_beams`` most likely continuations, kept step by step.

Each beam carries the sum of its tokens' log-probabilities. A step extends every beam by every
token, keeps the ``2 K`` best candidates per batch row and, in order, sends a candidate ending
in EOS to the row's finished hypotheses (when it ranks among the first ``K``) and makes the
others the next ``K`` beams. A hypothesis of ``n`` new tokens (its EOS included) scores::

    score = sum_i log p(y_i | y_<i, x) / n ** length_penalty

A row is done when it holds ``K`` finished hypotheses and (``early_stopping``) at once, or
(otherwise, Hugging Face's default) when no running beam can still beat the worst of them. At
``max_new_tokens`` the running beams join the finished ones. The ``num_return`` best come back
sorted by score.

:func:`search` is the loop over any scorer (``advance(beam_index, tokens) -> log-probs``);
:func:`beam_search` runs it on a model with the cache (decoder-only, or encoder-decoder from a
source), reordering the cache rows to follow the beams.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from functional_llm.generate.cache import reorder
from functional_llm.generate.processors import Context, Processor
from functional_llm.generate.search import decoder, start
from functional_llm.nn.dropout import inference

__all__ = ["Beams", "beam_search", "search"]

Advance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Beams(NamedTuple):
    """``tokens (B, n, new)``: each row's ``n`` best continuations (``pad_id`` after EOS), with
    ``valid`` marking their real tokens, and ``scores (B, n)``, best first."""

    tokens: torch.Tensor
    valid: torch.Tensor
    scores: torch.Tensor


def search(
    first: torch.Tensor,
    advance: Advance,
    *,
    num_beams: int,
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    length_penalty: float = 1.0,
    early_stopping: bool = False,
    num_return: int = 1,
    pad_id: int = 0,
) -> Beams:
    """Beam search from ``first: (B, V)``, the log-probabilities of the first new token.
    ``advance(beams, tokens)`` gets, for the ``B * K`` beams of the next step, which beam of
    the last step each continues (flat indices into ``B * K``) and the token it appended, and
    returns the log-probabilities of the token after it, ``(B * K, V)``."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if not 1 <= num_return <= num_beams:
        raise ValueError(f"num_return must be in [1, num_beams = {num_beams}], got {num_return}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch, vocab = first.shape
    k, eos = num_beams, set(eos_ids)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch
    seqs: list[list[list[int]]] = [[[] for _ in range(k)] for _ in range(batch)]
    scores = torch.full((batch, k), float("-inf"))
    scores[:, 0] = 0.0  # one live beam per row to start: the others would duplicate it
    logp = first.float().repeat_interleave(k, dim=0)

    def norm(total: float, length: int) -> float:
        return total / length**length_penalty

    def keep(b: int, score: float, tokens: list[int]) -> None:
        finished[b].append((score, tokens))
        finished[b].sort(key=lambda h: -h[0])
        del finished[b][k:]

    for t in range(max_new_tokens):
        candidates = (scores.reshape(-1, 1) + logp).reshape(batch, k * vocab)
        top, index = candidates.topk(min(2 * k, k * vocab), dim=-1)
        next_scores = torch.full((batch, k), float("-inf"))
        next_beams = torch.zeros(batch, k, dtype=torch.int64)
        next_tokens = torch.full((batch, k), pad_id, dtype=torch.int64)
        for b in range(batch):
            if done[b]:
                continue
            n = 0
            for rank, (s, i) in enumerate(zip(top[b].tolist(), index[b].tolist(), strict=True)):
                if s == float("-inf"):
                    break
                beam, token = divmod(i, vocab)
                if token in eos:
                    if rank < k:
                        keep(b, norm(s, t + 1), [*seqs[b][beam], token])
                    continue
                next_scores[b, n], next_beams[b, n], next_tokens[b, n] = s, beam, token
                n += 1
                if n == k:
                    break
            if len(finished[b]) == k:
                best_running = norm(float(next_scores[b].max()), t + 1)
                done[b] = early_stopping or finished[b][-1][0] >= best_running
        seqs = [
            [[*seqs[b][j], tok] for j, tok in zip(next_beams[b].tolist(), next_tokens[b].tolist(),
                                                  strict=True)]
            for b in range(batch)
        ]  # fmt: skip
        scores = next_scores
        if all(done) or t + 1 == max_new_tokens:
            break
        flat = (torch.arange(batch)[:, None] * k + next_beams).reshape(-1)
        logp = advance(flat, next_tokens.reshape(-1)).float()
    for b in range(batch):
        if not done[b]:
            for j in range(k):
                if float(scores[b, j]) > float("-inf"):
                    keep(b, norm(float(scores[b, j]), len(seqs[b][j])), seqs[b][j])
    return _pack(finished, num_return, max_new_tokens, pad_id)


def _pack(finished: list[list[tuple[float, list[int]]]], n: int, width: int, pad_id: int) -> Beams:
    batch = len(finished)
    tokens = torch.full((batch, n, width), pad_id, dtype=torch.int64)
    valid = torch.zeros(batch, n, width, dtype=torch.bool)
    scores = torch.full((batch, n), float("-inf"))
    for b, hyps in enumerate(finished):
        for j, (score, seq) in enumerate(hyps[:n]):
            tokens[b, j, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
            valid[b, j, : len(seq)] = True
            scores[b, j] = score
    return Beams(tokens, valid, scores)


def beam_search(
    model: Any,
    params: Any,
    prompt: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    src: torch.Tensor | None = None,
    src_valid: torch.Tensor | None = None,
    num_beams: int,
    max_new_tokens: int,
    eos_id: int | Sequence[int] | None = None,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
    num_return: int = 1,
    processors: Processor | None = None,
    pad_id: int | None = None,
) -> Beams:
    """Beam search from ``prompt: (B, T0)`` (left-padded where ``valid`` is False): the
    ``num_return`` best continuations per row and their scores. For an encoder-decoder model,
    ``src`` (padded where ``src_valid`` is False) is the source and ``prompt`` the decoder's
    start tokens. The prompt (and the source) run once per row; the cache is then copied to
    the row's beams.
    ``processors`` transform each step's log-probabilities (repetition penalty, banned
    n-grams, ...)."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    eos = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)
    pad = pad_id if pad_id is not None else (eos[0] if eos else 0)
    model = inference(model)
    valid = torch.ones_like(prompt, dtype=torch.bool) if valid is None else valid.bool()
    rows = torch.arange(prompt.shape[0]).repeat_interleave(num_beams)  # row b's K beams
    prompt_k, valid_k = prompt[rows], valid[rows]
    step = decoder(model, params)
    state: dict[str, Any] = {"history": prompt_k, "real": valid_k, "t": 0}

    def scored(logits: torch.Tensor) -> torch.Tensor:
        logp = logits.float().log_softmax(-1)
        if processors is None:
            return logp
        return processors(logp, Context(state["history"], state["real"], state["t"]))

    with torch.no_grad():
        width = prompt.shape[1] + max_new_tokens  # the prompt (and source) run once per row
        logits, cache = start(model, params, prompt, valid, src, src_valid, width)
        first = scored(logits[rows, -1]).reshape(prompt.shape[0], num_beams, -1)[:, 0]
        state["cache"] = reorder(cache, rows)  # then the cache rows are copied to the beams

        def advance(beams: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            state["history"] = torch.cat([state["history"][beams], tokens[:, None]], dim=1)
            state["real"] = torch.cat([state["real"][beams], torch.ones_like(tokens[:, None],
                                       dtype=torch.bool)], dim=1)  # fmt: skip
            state["t"] += 1
            logits, state["cache"] = step(reorder(state["cache"], beams), tokens[:, None])
            return scored(logits[:, -1])

        return search(
            first, advance, num_beams=num_beams, max_new_tokens=max_new_tokens, eos_ids=eos,
            length_penalty=length_penalty, early_stopping=early_stopping,
            num_return=num_return, pad_id=pad,
        )  # fmt: skip
