"""Train the encoder-decoder Transformer to summarise code, and score it with ROUGE.

    python -m experiments.summarize                        # stdlib functions -> docstrings
    python -m experiments.summarize --train cnn.jsonl --dev cnn_dev.jsonl \\
        --source-field article --target-field highlights --max-source 400
    python -m experiments.summarize --summarize my_module.py      # with the trained model

With no ``--train`` the corpus is the Python standard library's functions
(``experiments/parallel_corpora.py``): a function's source with its docstring removed, to be
summarised as the docstring's first line (code summarisation, as in CodeSearchNet); whole
modules are held out.

Scored with ROUGE-1/2/L (Google's ``rouge-score``) on the held-out functions, greedy and with
beam search, next to two baselines on the same functions: the function's name split into
words (``get_item_count`` -> "get item count") and the source's first line.
"""

from __future__ import annotations

import argparse
import ast
import re
from typing import Any

from experiments import cli, parallel_corpora
from experiments import seq2seq_task as task
from functional_llm import data, metrics

_NAME = re.compile(r"def\s+(\w+)")


def name_words(train: list[task.Pair], held: list[task.Pair]) -> list[str]:
    """The function's name as words: ``getItemCount`` and ``get_item_count`` -> "get item
    count"."""
    out = []
    for source, _ in held:
        found = _NAME.search(source)
        name = found.group(1) if found else ""
        spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).replace("_", " ")
        out.append(" ".join(spaced.lower().split()))
    return out


def first_line(train: list[task.Pair], held: list[task.Pair]) -> list[str]:
    return [source.strip().splitlines()[0] for source, _ in held]


def functions(path: str) -> list[str]:
    """The source of every function in a Python file, for ``--summarize``."""
    text = data.read_text(path)
    try:
        tree = ast.parse(text)
    except SyntaxError as err:
        raise data.DataError(f"{path}:{err.lineno}: not Python ({err.msg})") from None
    nodes = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    return [ast.get_source_segment(text, n) or "" for n in nodes]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--summarize", help="summarise every function of this Python file")
    task.add_args(p, "out/summarize", max_source=128, max_target=32)
    p.set_defaults(
        batch_size=32,
        max_steps=1100,
        warmup=200,
        dropout=0.1,
        eval_interval=100,
        ckpt_interval=100,
        average=4,
    )  # 6.4 epochs of 5,497 functions
    args = p.parse_args(argv)
    task.check_args(p, args)
    if args.summarize:
        sources = functions(args.summarize)
        for source, summary in zip(sources, task.use_trained(args, sources), strict=True):
            print(f"{source.splitlines()[0]}\n  -> {summary}")
        return {}
    baselines = {"the function's name as words": name_words, "the first source line": first_line}
    return task.run(args, parallel_corpora.summarization_corpus, baselines, metrics.rouge, "rougeL")


if __name__ == "__main__":
    cli.main_guard(main)
