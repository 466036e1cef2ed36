"""Train the article's encoder-decoder Transformer to translate, and score it with BLEU.

    python -m experiments.translate                       # English -> German, ~19 min
    python -m experiments.translate --lang fr             # any language with catalogs here
    python -m experiments.translate --train wmt.tsv --dev newstest.tsv
    python -m experiments.translate --translate "File not found"     # with the trained model

With no ``--train`` the corpus is the gettext message catalogs installed on the machine
(``experiments/parallel_corpora.py``): every program's English messages and their
translations, whole catalogs held out, so the scored messages come from programs the model
never saw. ``--train/--dev`` take TSV (``source<TAB>target``), JSONL or gettext files.

The model has a copy head by default (``--copy-source``, the pointer-generator of
:mod:`functional_llm.nn.pointer`): UI strings carry names, options, paths and format
specifiers over verbatim, which a model that must generate every token garbles.

Scored with sacrebleu's BLEU and chrF (its signature is printed) on the held-out pairs,
greedy and with beam search, next to two baselines on the same pairs: copying the source
(UI strings share names, numbers and format specifiers with their translations) and a
word-by-word dictionary learned from the training pairs (each source word's most associated
target word, by the Dice coefficient of their co-occurrence).
"""

from __future__ import annotations

import argparse
import collections
import re
from typing import Any

from experiments import cli, parallel_corpora
from experiments import seq2seq_task as task
from functional_llm import metrics

_WORD = re.compile(r"(\w+)")


def dictionary(train: list[task.Pair], held: list[task.Pair]) -> list[str]:
    """Word-by-word translation with the Dice-best target word of each source word (kept when
    none associates, as names and numbers usually should be)."""
    pairs = [({w.lower() for w in _WORD.findall(s)}, set(_WORD.findall(t))) for s, t in train]
    n_src, n_tgt = collections.Counter(), collections.Counter()
    both: collections.Counter = collections.Counter()
    for src, tgt in pairs:
        n_src.update(src)
        n_tgt.update(tgt)
        both.update((s, t) for s in src for t in tgt)
    best: dict[str, tuple[float, str]] = {}
    for (s, t), c in sorted(both.items()):  # sorted: ties go the same way in every process
        dice = 2 * c / (n_src[s] + n_tgt[t])
        if dice > best.get(s, (0.1, ""))[0]:
            best[s] = (dice, t)
    translate = lambda w: best[w.lower()][1] if w.lower() in best else w  # noqa: E731
    return ["".join(translate(p) if i % 2 else p for i, p in enumerate(_WORD.split(s)))
            for s, _ in held]  # fmt: skip


def scores(hypotheses: Any, references: Any) -> dict[str, Any]:
    b, c = metrics.bleu(hypotheses, references), metrics.chrf(hypotheses, references)
    return {"bleu": b["bleu"], "chrf": c["chrf"], "signature": b["signature"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lang", default="de", help="the target language of the default corpus")
    p.add_argument("--translate", action="append", help="translate this with the trained model")
    task.add_args(p, "out/translate", max_source=96, max_target=96)
    p.set_defaults(max_steps=3000, warmup=200, eval_interval=300, ckpt_interval=300, average=4,
                   copy_source=True)  # fmt: skip
    args = p.parse_args(argv)
    task.check_args(p, args)
    if args.translate:
        for source, target in zip(args.translate, task.use_trained(args, args.translate),
                                  strict=True):  # fmt: skip
            print(f"{source}\n  -> {target}")
        return {}
    baselines = {"copy the source": lambda train, held: [s for s, _ in held],
                 "word-by-word dictionary": dictionary}  # fmt: skip
    corpus = lambda: parallel_corpora.translation_corpus(args.lang)  # noqa: E731
    return task.run(args, corpus, baselines, scores, "bleu")


if __name__ == "__main__":
    cli.main_guard(main)
