"""Parallel corpora every machine has, for translation and summarisation without a download.

* **English -> another language** from the gettext message catalogs installed on the machine:
  the compiled ``<localedir>/<lang>/LC_MESSAGES/*.mo`` files that programs (coreutils, apt,
  bash, glib, ...) ship their translations in. Pairs whose source is only a format string
  (``"%s: %s"``) or longer than ``max_chars`` are dropped, every source is kept once, and whole
  catalogs are held out (every ``every``-th, by name), so the dev messages come from programs
  the model never saw; a dev message whose source also occurs in training is dropped.
* **Code -> summary** from the Python standard library: a function's source with its
  docstring removed, and the first line of that docstring (code summarisation, as in
  CodeSearchNet). Whole modules are held out (every ``every``-th, by path).
"""

from __future__ import annotations

import ast
import gettext
import re
import sys
import textwrap
from pathlib import Path

from experiments import stdlib_text
from functional_llm import data

Pair = tuple[str, str]

LOCALE_DIRS = tuple(
    dict.fromkeys(
        Path(d)
        for d in (
            "/usr/share/locale",
            "/usr/local/share/locale",
            Path(sys.base_prefix) / "share" / "locale",
            gettext._default_localedir,  # type: ignore[attr-defined]  # gettext's own default
        )
    )
)
_FORMAT = re.compile(r"%(?:\d+\$)?[-+ #0-9.*]*(?:l|ll|h|z|j|t|L)?[a-zA-Z%]|\{[^{}]*\}|<[^<>]+>")


def catalogs(lang: str, dirs: tuple[Path, ...] = LOCALE_DIRS) -> list[Path]:
    """The ``.mo`` catalogs of ``lang`` under ``dirs``, sorted by file name."""
    found = {p for d in dirs for p in Path(d).glob(f"{lang}/LC_MESSAGES/*.mo")}
    return sorted(found, key=lambda p: (p.name, str(p)))


def languages(dirs: tuple[Path, ...] = LOCALE_DIRS) -> list[str]:
    """The languages that have at least one catalog under ``dirs``."""
    return sorted({p.parts[-3] for d in dirs for p in Path(d).glob("*/LC_MESSAGES/*.mo")})


def usable(source: str, target: str, max_chars: int) -> bool:
    """A pair worth learning: some words outside format specifiers, and short enough."""
    words = _FORMAT.sub("", source)
    return bool(re.search(r"[A-Za-z]{2}", words)) and 0 < len(source) <= max_chars and bool(
        target.strip()
    )  # fmt: skip


def translation_corpus(
    lang: str = "de", *, max_chars: int = 200, every: int = 10, dirs: tuple[Path, ...] = LOCALE_DIRS
) -> tuple[list[Pair], list[Pair]]:
    """``(train, dev)`` English -> ``lang`` pairs from the installed catalogs."""
    found = catalogs(lang, dirs)
    if not found:
        have = ", ".join(languages(dirs)) or "none"
        raise data.DataError(
            f"no gettext catalogs for {lang!r} under {', '.join(map(str, dirs))}; languages "
            f"with catalogs here: {have}"
        )
    train: dict[str, str] = {}
    dev: dict[str, str] = {}
    for i, path in enumerate(found):
        part = dev if len(found) >= every and i % every == every - 1 else train
        try:
            pairs = data.read_catalog(path)
        except data.DataError:
            continue  # a damaged catalog of the system is not the user's to fix
        for source, target in pairs:
            if usable(source, target, max_chars):
                part.setdefault(source, target)
    dev = {s: t for s, t in dev.items() if s not in train}
    if not train or not dev:
        raise data.DataError(
            f"the {len(found)} {lang!r} catalogs give {len(train)} training and {len(dev)} "
            f"held-out pairs; need both (hold-out needs at least {every} catalogs)"
        )
    return list(train.items()), list(dev.items())


def summarization_corpus(
    *, every: int = 10, max_lines: int = 60, root: Path | None = None
) -> tuple[list[Pair], list[Pair]]:
    """``(train, dev)`` pairs of (function source without its docstring, the docstring's first
    line) from the standard library (or the ``.py`` files under ``root``)."""
    base = stdlib_text.stdlib_root() if root is None else root
    files = stdlib_text.stdlib_sources() if root is None else sorted(
        p.relative_to(base) for p in base.rglob("*.py")
    )  # fmt: skip
    split: tuple[list[Pair], list[Pair]] = ([], [])
    for i, relative in enumerate(files):
        try:
            text = (base / relative).read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            pair = _function_pair(text, node, max_lines)
            if pair is not None:
                split[i % every == every - 1].append(pair)
    if not split[0] or not split[1]:
        raise data.DataError(f"{base}: {len(split[0])} training and {len(split[1])} held-out "
                             "functions with docstrings; need both")  # fmt: skip
    return split


def _function_pair(text: str, node: ast.AST, max_lines: int) -> Pair | None:
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return None
    doc = ast.get_docstring(node)
    if not doc or node.end_lineno is None or node.end_lineno - node.lineno > max_lines:
        return None
    summary = doc.strip().splitlines()[0].strip()
    if len(summary.split()) < 3:
        return None
    first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    lines = text.splitlines()[first - 1 : node.end_lineno]
    docstring = node.body[0]
    cut = range(docstring.lineno - first, (docstring.end_lineno or docstring.lineno) - first + 1)
    kept = [line for k, line in enumerate(lines) if k not in cut]
    if len(node.body) == 1:  # only a docstring: the function's body would be empty
        return None
    source = textwrap.dedent("\n".join(kept)).strip()
    return (source, summary) if source else None
