"""How well a code model writes Python, measured on held-out standard-library files.

* **bits per byte**: the held-out loss in bits over the UTF-8 bytes it covers, comparable
  across tokenizers (a BPE token carries several bytes, a character one or more);
* **next-line exact match**: given a file up to a line (the last ``context`` tokens), the
  greedy continuation up to its newline (at most 160 tokens) equals that line (trailing
  spaces ignored);
* **syntax-valid bodies**: given a file up to a ``def`` line, the greedy continuation up to the
  first line indented no deeper than the ``def`` (at most ``max_chars`` characters) makes the
  function parse with ``ast.parse``.

Every sample is drawn from the held-out files with one key, so two models are scored on the
same lines and functions. Tokens the tokenizer cannot encode are skipped (a character
tokenizer meets characters it has never seen).
"""

from __future__ import annotations

import ast
import math
import textwrap
from collections.abc import Sequence
from typing import Any

import torch

from functional_llm import generate as G
from functional_llm import random
from functional_llm.generate.processors import Context

__all__ = ["bits_per_byte", "evaluate", "next_line_accuracy", "samples", "syntax_valid_share"]


def bits_per_byte(loss_nats: float, n_tokens: int, text: str) -> float:
    """A per-token loss in nats as bits per UTF-8 byte of the ``text`` its tokens spell."""
    return loss_nats * n_tokens / (len(text.encode("utf-8")) * math.log(2))


def samples(files: Sequence[str], key: Any, n: int) -> tuple[list[tuple], list[tuple]]:
    """``(lines, functions)``: up to ``n`` ``(file, line_start, line)`` next-line cases (lines
    with at least 8 non-space characters) and ``n`` ``(file, def_line_end, indent)``
    function cases, drawn with ``key`` from every file that parses."""
    lines, functions = [], []
    for f, text in enumerate(files):
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        starts = [0]
        for ln in text.splitlines(keepends=True):
            starts.append(starts[-1] + len(ln))
        for i, ln in enumerate(text.splitlines()):
            if len(ln.strip()) >= 8 and i > 0:
                lines.append((f, starts[i], ln.rstrip()))
        for node in ast.walk(tree):
            one_line = isinstance(node, ast.FunctionDef) and node.lineno == node.body[0].lineno - 1
            if one_line:
                end = starts[node.lineno]  # just after the def line (a one-line header)
                functions.append((f, end, node.col_offset))
    k_lines, k_funcs = random.split(key)
    return _pick(k_lines, lines, n), _pick(k_funcs, functions, n)


def _pick(key: Any, cases: list[tuple], n: int) -> list[tuple]:
    """``n`` of ``cases`` drawn without replacement by ``key``, in their order."""
    return [cases[i] for i in sorted(random.permutation(key, len(cases))[:n].tolist())]


def _context(tok: Any, text: str, room: int) -> torch.Tensor | None:
    try:
        ids = torch.as_tensor(tok.encode(text))
    except ValueError:
        return None
    return ids[-room:] if len(ids) else None


def _greedy(model: Any, params: Any, tok: Any, prompt: torch.Tensor, done: Any, limit: int) -> str:
    """The greedy continuation of ``prompt`` until ``done(text)`` or ``limit`` new tokens."""
    skip = prompt.shape[0]

    def stop(context: Context) -> torch.Tensor:
        row = context.tokens[0, skip:][context.valid[0, skip:]].tolist()
        return torch.tensor([done(tok.decode(row))])

    out = G.generate(
        model,
        params,
        prompt[None],
        max_new_tokens=limit,
        stop=stop,
        max_len=model.config.max_seq_len,
        rolling=True,
    )  # past the window
    return tok.decode(out.tokens[0, skip:][out.valid[0, skip:]].tolist())


def next_line_accuracy(model: Any, params: Any, tok: Any, files: Sequence[str],
                       cases: Sequence[tuple], context: int) -> float:  # fmt: skip
    """The prompt stops before the newline that ends the previous line: a BPE merges a newline
    with the next line's indentation, so a prompt ending in a bare newline would be one no
    training window has; the model writes that newline itself."""
    hits, seen = 0, 0
    room = min(context, model.config.max_seq_len - 1)
    for f, at, line in cases:
        prompt = _context(tok, files[f][: at - 1], room)
        if prompt is None:
            continue
        text = _greedy(model, params, tok, prompt, lambda t: t.count("\n") >= 2, 160)
        lines = text.split("\n")
        hits += int(len(lines) > 1 and lines[0] == "" and lines[1].rstrip() == line)
        seen += 1
    return hits / max(seen, 1)


def _body(lines: list[str], indent: int, complete: bool) -> list[str]:
    """The lines up to the first non-blank one indented ``<= indent``; when there is none
    (the budget ran out), the complete lines only."""
    for i, ln in enumerate(lines):
        if ln.strip() and len(ln) - len(ln.lstrip()) <= indent:
            return lines[:i]
    return lines if complete else lines[:-1]


def _ends_body(text: str, indent: int) -> bool:
    """Whether a complete line after the header's is indented ``<= indent``."""
    lines = text.split("\n")[1:-1]  # after the header's rest; complete lines only
    return any(ln.strip() and len(ln) - len(ln.lstrip()) <= indent for ln in lines)


def syntax_valid_share(model: Any, params: Any, tok: Any, files: Sequence[str],
                       cases: Sequence[tuple], context: int,
                       max_chars: int = 600) -> float:  # fmt: skip
    """The prompt is the file up to the ``def`` line's colon (its newline left to the model,
    as in :func:`next_line_accuracy`); the function is the header line as the model ends it
    and the body lines it writes."""
    valid, seen = 0, 0
    room = min(context, model.config.max_seq_len - 1)
    for f, end, indent in cases:
        text = files[f]
        prompt = _context(tok, text[: end - 1], room)
        if prompt is None:
            continue
        done = lambda t, i=indent: _ends_body(t, i) or len(t) >= max_chars  # noqa: E731
        written = _greedy(model, params, tok, prompt, done, max_chars)
        header = text[: end - 1].split("\n")[-1] + written.split("\n")[0]
        body = _body(written.split("\n")[1:], indent, complete=_ends_body(written, indent))
        try:
            ast.parse(textwrap.dedent("\n".join([header, *body])))
            valid += 1
        except SyntaxError:
            pass
        seen += 1
    return valid / max(seen, 1)


def evaluate(model: Any, params: Any, tok: Any, files: Sequence[str], *, key: Any,
             n: int = 100, context: int | None = None) -> dict[str, float]:  # fmt: skip
    """Next-line exact match and the syntax-valid share of generated bodies on ``n`` cases
    of each, drawn from ``files`` with ``key``; the context is the model's window (less one)
    by default, and generation rolls past it (``generate(rolling=True)``)."""
    context = context or model.config.max_seq_len - 1
    lines, functions = samples(files, key, n)
    with torch.no_grad():
        return {
            "next_line_exact": next_line_accuracy(model, params, tok, files, lines, context),
            "syntax_valid": syntax_valid_share(model, params, tok, files, functions, context),
        }
