"""Help-desk conversations about the Python standard library, made from its own documentation.

Every public top-level function and class, and every public method of those classes, with a
docstring in the standard library's sources (read with ``ast``: nothing is imported or run)
gives one conversation:

* the user asks what ``module.name`` does (one of a few phrasings, chosen by a key); the
  assistant answers with the docstring's summary (its first sentence);
* the user asks for its signature; the assistant gives ``name(parameters)`` as written in the
  source (a class's from its ``__init__``);
* when the docstring holds a doctest, the user asks for an example and the assistant gives its
  first ``>>>`` line and the output shown under it.

A third of the conversations start with a system message. Every 10th source file (sorted by
path) is held out, as in :mod:`experiments.stdlib_text`: dev conversations are about modules
never seen in training.
"""

from __future__ import annotations

import ast
from functools import cache

from experiments.stdlib_text import TESTS, sentences, stdlib_root, stdlib_sources
from functional_llm import random

SYSTEM = "You are a help desk for the Python standard library. Answer briefly."
ASK = (
    "What does {name} do?",
    "Can you tell me what {name} is for?",
    "What is {name} used for?",
    "Explain {name} in one sentence.",
)
ASK_SIGNATURE = ("What is its signature?", "How do I call it?", "Which arguments does it take?")
ASK_EXAMPLE = ("Can you show an example?", "Show me how to use it.", "Do you have an example?")


def _signature(node: ast.FunctionDef | ast.ClassDef) -> str | None:
    if isinstance(node, ast.ClassDef):
        init = next((n for n in node.body if isinstance(n, ast.FunctionDef)
                     and n.name == "__init__"), None)  # fmt: skip
        if init is None:
            return None
        args = ast.unparse(init.args).removeprefix("self").lstrip(", ")
    else:
        args = ast.unparse(node.args)
    return f"{node.name}({args})"


def _example(doc: str) -> str | None:
    """The first doctest line of ``doc`` and the output lines under it."""
    lines = [ln.strip() for ln in doc.splitlines()]
    for i, ln in enumerate(lines):
        if ln.startswith(">>> "):
            out = [ln]
            for nxt in lines[i + 1 :]:
                if not nxt or nxt.startswith(">>>"):
                    break
                out.append(nxt)
            return "\n".join(out[:4])
    return None


def _conversation(key, module: str, node: ast.FunctionDef | ast.ClassDef, doc: str) -> list:
    summary = sentences(doc)[:1]
    if not summary or len(summary[0]) > 300:
        return []
    k_sys, k_ask, k_sig, k_ex = random.split(key, 4)
    pick = lambda k, options: options[int(random.randint(k, (), 0, len(options)))]  # noqa: E731
    name = f"{module}.{node.name}"
    messages = [{"role": "system", "content": SYSTEM}] if int(
        random.randint(k_sys, (), 0, 3)
    ) == 0 else []  # fmt: skip
    messages += [{"role": "user", "content": pick(k_ask, ASK).format(name=name)},
                 {"role": "assistant", "content": summary[0]}]  # fmt: skip
    signature = _signature(node)
    if signature is not None and len(signature) <= 200:
        messages += [{"role": "user", "content": pick(k_sig, ASK_SIGNATURE)},
                     {"role": "assistant", "content": signature}]  # fmt: skip
    example = _example(doc)
    if example is not None:
        messages += [{"role": "user", "content": pick(k_ex, ASK_EXAMPLE)},
                     {"role": "assistant", "content": example}]  # fmt: skip
    return messages


@cache
def conversations(seed: int = 0) -> tuple[list[list[dict]], list[list[dict]]]:
    """``(train, held_out)`` conversations, one per documented public function or class."""
    root = stdlib_root()
    split: tuple[list, list] = ([], [])
    base = random.key(seed)
    for i, relative in enumerate(stdlib_sources(TESTS | {"lib2to3", "turtledemo"})):
        if relative.name.startswith("_") and relative.name != "__init__.py":
            continue
        try:
            tree = ast.parse((root / relative).read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        for j, (owner, node) in enumerate(_documented(module, tree)):
            doc = ast.get_docstring(node)
            if doc:
                messages = _conversation(random.fold_in(random.fold_in(base, i), j), owner,
                                         node, doc)  # fmt: skip
                if messages:
                    split[i % 10 == 9].append(messages)
    return split


def _documented(module: str, tree: ast.Module) -> list[tuple[str, ast.FunctionDef | ast.ClassDef]]:
    """Public top-level functions and classes, and the public methods of those classes, each
    with the dotted name it is asked about under (``module`` or ``module.Class``)."""
    out: list[tuple[str, ast.FunctionDef | ast.ClassDef]] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
            out.append((module, node))
            if isinstance(node, ast.ClassDef):
                methods = [m for m in node.body if isinstance(m, ast.FunctionDef)]
                out += [(f"{module}.{node.name}", m) for m in methods if m.name[0] != "_"]
    return out
