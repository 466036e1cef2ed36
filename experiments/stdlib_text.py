"""English text every machine has, and small honest tasks derived from it.

The text is the Python standard library's documentation prose: the docstrings of its modules,
classes and functions (read with ``ast``, nothing is imported or run), and the language
reference topics of ``pydoc_data.topics``. A module's docstrings, or one topic, form a document;
documents are split into sentences. Every 10th module (sorted by path) and every 10th topic is
held out, so no task's dev split shares a document with its training split.

Derived tasks (labels come from the source's structure, not from people):

* **classify** -- the first sentence of a docstring; its label is what the docstring documents:
  ``module``, ``class`` or ``function`` (e.g. "Return the ..." is usually a function).
* **tagging** -- docstring sentences split on whitespace; words that were written as code
  (````name```` or ```name```) are entities ``B-CODE``/``I-CODE``, with the quotes removed so
  the model must tell code from prose by the words themselves (underscores, parentheses,
  dotted names, context).
* **qa** (cloze, SQuAD 2.0 style) -- the context is a run of up to 4 consecutive sentences; the
  question is ``fill in: <a sentence with one word replaced by ___>``, and the answer is that
  word's span in the context. Half the questions use a sentence from another document: they
  are unanswerable and the right answer is empty.
"""

from __future__ import annotations

import ast
import math
import re
import sysconfig
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from functional_llm import random
from functional_llm.data import QAExample

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`\"'(])")
_CODE = re.compile(r"``([^`]+)``|`([^`]+)`")
_QUOTED = re.compile(r'"([^"\s]+(?: [^"\s]+){0,2})"')  # pydoc's rendering of :keyword:`if`


@dataclass(frozen=True)
class Docstring:
    module: str
    kind: str  # "module", "class" or "function"
    text: str
    held_out: bool


def sentences(text: str) -> list[str]:
    """Prose sentences of a docstring: doctest and indented code lines dropped, whitespace
    collapsed, at least 4 words."""
    lines = [ln for ln in text.splitlines() if not ln.startswith(("    ", "\t", ">>>", "..."))]
    prose = " ".join(" ".join(lines).split())
    return [s for s in _SENTENCE_END.split(prose) if len(s.split()) >= 4]


TESTS = frozenset({"test", "tests", "idle_test", "site-packages"})


def stdlib_sources(skip: frozenset[str] = TESTS) -> list[Path]:
    """The standard library's ``.py`` files, sorted, relative to its root (:func:`stdlib_root`),
    leaving out any under a folder named in ``skip`` (by default the test suites)."""
    root = stdlib_root()
    relative = (p.relative_to(root) for p in sorted(root.rglob("*.py")))
    return [p for p in relative if skip.isdisjoint(p.parts)]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus(max_mb: float) -> str:
    """The standard library's ``.py`` files (tests skipped): every k-th in sorted order, about
    ``max_mb`` MB, arranged so that every tenth chosen file comes last (the validation split)."""
    train, held_out = stdlib_files(max_mb)
    return "".join(train + held_out)


@cache
def stdlib_files(max_mb: float) -> tuple[list[str], list[str]]:
    """:func:`stdlib_corpus`'s files as ``(training, held_out)`` texts, each headed by a
    ``# path`` comment line."""
    root = stdlib_root()
    texts = []
    for relative in stdlib_sources():
        try:
            source = (root / relative).read_text(encoding="utf-8")
            texts.append(f"# {relative.as_posix()}\n{source}\n")
        except (UnicodeDecodeError, OSError):
            continue
    stride = max(1, math.ceil(sum(map(len, texts)) / (max_mb * 1e6)))
    chosen = texts[::stride]
    held_out = [t for i, t in enumerate(chosen) if i % 10 == 9]
    return [t for i, t in enumerate(chosen) if i % 10 != 9], held_out


@cache
def docstrings() -> tuple[Docstring, ...]:
    root = stdlib_root()
    files = stdlib_sources(TESTS | {"lib2to3", "turtledemo"})
    out = []
    for i, relative in enumerate(files):
        path = root / relative
        try:
            module = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        name = ".".join(relative.with_suffix("").parts)
        for node in ast.walk(module):
            kinds = {ast.Module: "module", ast.ClassDef: "class", ast.FunctionDef: "function"}
            kind = kinds.get(type(node))
            text = ast.get_docstring(node) if kind else None
            if text:
                out.append(Docstring(name, kind, text, held_out=i % 10 == 9))
    return tuple(out)


def documents() -> tuple[list[list[str]], list[list[str]]]:
    """``(train, held_out)`` documents as lists of sentences: one per module, one per topic."""
    from pydoc_data.topics import topics

    by_module: dict[tuple[str, bool], list[str]] = {}
    for d in docstrings():
        by_module.setdefault((d.module, d.held_out), []).extend(sentences(d.text))
    train = [s for (_, held), s in by_module.items() if not held and s]
    held = [s for (_, held), s in by_module.items() if held and s]
    for i, name in enumerate(sorted(topics)):
        (held if i % 10 == 9 else train).append(sentences(topics[name]))
    return train, held


def classify_task() -> tuple[list[dict], list[dict]]:
    """First sentences of docstrings labelled ``module``, ``class`` or ``function``."""
    split: tuple[list[dict], list[dict]] = ([], [])
    for d in docstrings():
        first = sentences(d.text)[:1]
        if first:
            split[d.held_out].append({"text": first[0], "label": d.kind})
    return split


def _tag(sentence: str, code_pattern: re.Pattern[str]) -> tuple[list[str], list[str]]:
    words, tags, at = [], [], 0
    for m in code_pattern.finditer(sentence):
        plain = sentence[at : m.start()].split()
        code = next(g for g in m.groups() if g).split()
        words += plain + code
        tags += ["O"] * len(plain) + ["B-CODE"] + ["I-CODE"] * (len(code) - 1)
        at = m.end()
    rest = sentence[at:].split()
    return words + rest, tags + ["O"] * len(rest)


def tagging_task(max_sentences: int = 20000) -> tuple[list, list]:
    """Sentences as ``(words, BIO tags)``; code spans are ``CODE`` entities (backquoted in
    docstrings, double-quoted in the reference topics). Every sentence with code is kept, and
    as many without."""
    from pydoc_data.topics import topics

    texts = [(d.text, d.held_out, _CODE) for d in docstrings()]
    texts += [(topics[t], i % 10 == 9, _QUOTED) for i, t in enumerate(sorted(topics))]
    split: tuple[list, list] = ([], [])
    for text, held_out, pattern in texts:
        for s in sentences(text):
            words, tags = _tag(s, pattern)
            if words and len(words) <= 60:
                split[held_out].append((words, tags))
    out = []
    for part in split:
        with_code = [x for x in part if "B-CODE" in x[1]]
        without = [x for x in part if "B-CODE" not in x[1]][: len(with_code)]
        out.append((with_code + without)[:max_sentences])
    return out[0], out[1]


def _cloze(key, context_docs, other_docs, prefix: str) -> list[QAExample]:
    """Questions over runs of 4 sentences: one per sentence of the run, each a coin flip
    between that sentence (answerable from the run) and a sentence of another document (not
    answerable), with one word of 4+ letters blanked. A document's draws are one uniform
    block from ``fold_in(key, d)``: ``(run, sentence, [coin, document, sentence, word])``."""
    examples = []
    for d, doc in enumerate(context_docs):
        starts = range(0, len(doc) - 1, 4)
        draws = random.uniform(random.fold_in(key, d), (len(starts), 4, 4)).tolist()
        for first, run_draws in zip(starts, draws, strict=True):
            run = doc[first : first + 4]
            context = " ".join(run)
            for j, (coin, u_doc, u_sentence, u_word) in enumerate(run_draws[: len(run)]):
                answerable, source = coin < 0.5, run[j]
                if not answerable:  # a sentence of another document
                    other = other_docs[int(u_doc * len(other_docs))]
                    if other is doc or not other:
                        continue
                    source = other[int(u_sentence * len(other))]
                words = source.split()
                candidates = [i for i, w in enumerate(words) if w.isalpha() and len(w) > 3]
                if not candidates:
                    continue
                i = candidates[int(u_word * len(candidates))]
                question = "fill in: " + " ".join([*words[:i], "___", *words[i + 1 :]])
                qid = f"{prefix}-{d}-{first}-{j}"
                if answerable:
                    at = context.index(source) + len(" ".join(words[:i])) + (i > 0)
                    examples.append(QAExample(qid, question, context, (words[i],), (at,)))
                else:
                    examples.append(QAExample(qid, question, context, (), (), impossible=True))
    return examples


def qa_task(seed: int = 0) -> tuple[list[QAExample], list[QAExample]]:
    train_docs, held_docs = documents()
    key = random.key(seed)
    return (
        _cloze(random.fold_in(key, 0), train_docs, train_docs, "train"),
        _cloze(random.fold_in(key, 1), held_docs, held_docs, "dev"),
    )
