"""Fine-tune a text classifier, and score it next to a bag-of-words Naive Bayes baseline.

    python -m experiments.finetune_classify                            # stdlib docstring kinds
    python -m experiments.finetune_classify --pretrained out/pretrain_bert \\
        --train sst2/train.tsv --dev sst2/dev.tsv                      # SST-2 sentiment
    python -m experiments.finetune_classify --backbone gpt             # a GPT classifier

With no ``--train`` the task is derived from the standard library (``stdlib_text.py``): the
first sentence of a docstring, labelled by what it documents (module, class or function);
modules are split 9:1 between training and dev. ``--train``/``--dev`` take CSV, TSV or JSONL
files with ``text`` (or ``sentence``), optional ``text_pair`` (or ``sentence2``), and ``label``.

The baseline is multinomial Naive Bayes on lower-cased word counts (Laplace smoothing),
trained and scored on the same split by this script. Writes ``metrics.jsonl``, ``curves.png``
and ``model.safetensors`` to ``--out-dir``; the last line printed compares the two.
"""

from __future__ import annotations

import argparse
import collections
import math
import re

import numpy as np
import torch

import functional_llm as fl
from experiments import cli, stdlib_text
from experiments import finetune_common as common
from functional_llm import data, losses, metrics, random

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def features(text: str, ngrams: int = 1) -> list[str]:
    """The lower-cased words of ``text`` and, up to ``ngrams``, its runs of consecutive words
    (``"not good"``), as scikit-learn's ``CountVectorizer(ngram_range=(1, ngrams))`` counts
    them."""
    w = words(text)
    return [" ".join(w[i : i + n]) for n in range(1, ngrams + 1) for i in range(len(w) - n + 1)]


def naive_bayes(train: list[dict], dev: list[dict], alpha: float = 1.0, ngrams: int = 1) -> list:
    """Multinomial Naive Bayes: ``argmax_c log P(c) + sum_w log P(w | c)``, with
    ``P(w | c) = (n_cw + alpha) / (n_c + alpha |V|)`` over the word n-grams up to ``ngrams``
    (:func:`features`); those unseen in training are skipped."""
    text = lambda e: e["text"] + " " + e.get("text_pair", "")  # noqa: E731
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    priors = collections.Counter(e["label"] for e in train)
    for e in train:
        counts[e["label"]].update(features(text(e), ngrams))
    vocab = set().union(*counts.values())
    totals = {c: sum(n.values()) for c, n in counts.items()}
    out = []
    for e in dev:
        seen = [w for w in features(text(e), ngrams) if w in vocab]
        scores = {
            c: math.log(priors[c] / len(train))
            + sum(math.log((counts[c][w] + alpha) / (totals[c] + alpha * len(vocab))) for w in seen)
            for c in priors
        }
        out.append(max(scores, key=scores.get))
    return out


def noised(
    features: list[dict], tok: data.SubwordTokenizer, args: argparse.Namespace
) -> list[dict]:
    """The encoded examples and ``--augment-copies`` noised copies of each: tokens blanked to
    ``[MASK]`` and replaced by random ids, each at ``--augment-alpha``, special tokens kept
    (lengths and segments unchanged). Copy ``c`` of example ``i`` uses ``fold_in(fold_in(
    key(seed + 4), i), c)``."""
    base, specials = random.key(args.seed + 4), torch.tensor(tok.special_ids)
    out = list(features)
    for i, f in enumerate(features):
        ids = torch.as_tensor(f["tokens"])
        keep = torch.isin(ids, specials)
        for c in range(args.augment_copies):
            k_blank, k_replace = random.split(random.fold_in(random.fold_in(base, i), c))
            noisy = data.augment.token_blank(k_blank, ids, args.augment_alpha,
                                             tok.id_of("mask"), keep)  # fmt: skip
            noisy = data.augment.token_replace(k_replace, noisy, args.augment_alpha,
                                               tok.vocab_size, keep)  # fmt: skip
            out.append({**f, "tokens": noisy.numpy()})
    return out


def augmented(examples: list[dict], args: argparse.Namespace) -> list[dict]:
    """The examples and ``--augment-copies`` EDA copies of each text (same label), the copies
    of example ``i`` drawn with ``fold_in(key(seed + 3), i)``."""
    base = random.key(args.seed + 3)
    out = list(examples)
    for i, e in enumerate(examples):
        copies = data.augment.eda(random.fold_in(base, i), e["text"].split(),
                                  args.augment_copies, args.augment_alpha)  # fmt: skip
        out += [{**e, "text": " ".join(words)} for words in copies if words]
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train", help="CSV/TSV/JSONL training file (default: stdlib task)")
    p.add_argument("--dev", help="CSV/TSV/JSONL dev file (needed with --train)")
    p.add_argument(
        "--augment", choices=("none", "eda", "noise"), default="none",
        help="eda: add --augment-copies noised copies of each training text (data.augment.eda);\n"
             "noise: of each encoded text, tokens blanked to [MASK] and replaced at random,\n"
             "each at --augment-alpha (fairseq's noising; special tokens kept)",
    )  # fmt: skip
    p.add_argument("--augment-copies", type=cli.positive_int, default=4)
    p.add_argument("--augment-alpha", type=cli.rate, default=0.1, help="share of words touched")
    p.add_argument(
        "--pooling", choices=("backbone", "mean"), default="backbone",
        help="the sequence's vector: the backbone's ([CLS] pooler, GPT's last token)\n"
             "or the mean of the tokens' states (for MLM-only pretraining: no NSP)",
    )  # fmt: skip
    common.add_args(p, "out/finetune_classify")
    args = common.parse(p, argv)
    train_ex, dev_ex = common.train_dev(
        p, args, data.read_classification, stdlib_text.classify_task
    )
    labels = data.label_vocab(train_ex)  # of the whole split: a small draw may miss one
    train_ex = common.budget(p, args, train_ex)
    if args.augment == "eda":
        train_ex = augmented(train_ex, args)
    run = common.open_run(args)  # once the data is known to be usable: nothing half-made
    print(f"{len(train_ex):,} training and {len(dev_ex):,} dev examples; labels {labels}")

    texts = lambda: [e["text"] for e in train_ex] + [e.get("text_pair", "") for e in train_ex]  # noqa: E731
    tok, backbone, pretrained = common.backbone(args, texts)
    model = fl.models.SequenceClassifier(
        backbone, num_labels=len(labels), dropout=args.dropout, pooling=args.pooling
    )
    params = common.init_params(model, pretrained, random.key(args.seed))
    encode = lambda ex: data.encode_classification(tok, ex, labels, args.max_length)  # noqa: E731
    train_f, dev_f = encode(train_ex), encode(dev_ex)
    if args.augment == "noise":
        train_f = noised(train_f, tok, args)
    segments = () if isinstance(backbone, fl.models.GPT) else ("token_types",)  # GPT has none
    pad = common.collate(tok.id_of("pad"), ("tokens", *segments, "label"))
    gold = [f["label"] for f in dev_f]

    def evaluate(params) -> dict[str, float]:
        pred = [int(np.argmax(s)) for s in common.predict(model, params, dev_f, pad, False)]
        return {"accuracy": metrics.accuracy(pred, gold), "macro_f1": metrics.macro_f1(pred, gold)}

    loss = losses.classification(model)
    meta = common.model_meta(tok, backbone, labels=list(labels), task="classify",
                             pooling=args.pooling)  # fmt: skip
    _, final = common.fit(args, loss, params, model, train_f, pad, evaluate, run, meta)
    baseline = naive_bayes(train_ex, dev_ex)
    gold_names = [e["label"] for e in dev_ex]
    nb = {"nb_accuracy": metrics.accuracy(baseline, gold_names),
          "nb_macro_f1": metrics.macro_f1(baseline, gold_names)}  # fmt: skip
    run.record({"final": True, **final, **nb})
    run.close(not args.no_plot, "accuracy")
    print(f"dev accuracy {final['accuracy']:.4f} (macro-F1 {final['macro_f1']:.4f}) fine-tuned; "
          f"{nb['nb_accuracy']:.4f} (macro-F1 {nb['nb_macro_f1']:.4f}) Naive Bayes")  # fmt: skip
    return {**final, **nb}


if __name__ == "__main__":
    cli.main_guard(main)
