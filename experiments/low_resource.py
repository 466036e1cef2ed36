"""What pretraining buys at a label budget: the same backbone fine-tuned from its pretrained
weights and from fresh ones on N labelled examples, over seeds, beside n-gram Naive Bayes.

    python -m experiments.pretrain_bert --data sst2/train.tsv --max-length 64 --dropout 0 \\
        --whole-word --max-steps 6000 --batch-size 128 --warmup 300 --out-dir out/pretrain_sst2
    python -m experiments.low_resource --pretrained out/pretrain_sst2 --pooling mean \\
        --train sst2/train.tsv --dev sst2/dev.tsv --labels 500 1000 4000 --seeds 5 --full
    python -m experiments.low_resource --pretrained out/pretrain_bert    # the stdlib task

For each budget N and seed s, ``finetune_classify`` draws N training examples with key s
(``--train-sample``) and fine-tunes on them twice: from the pretrained backbone, and from
fresh weights of the same shape with the same tokenizer (``--reinit``), so the two differ
only in the weights pretraining learnt. Both train for at least ``--min-steps`` steps (whole
epochs). A multinomial Naive Bayes over word uni- and bigrams is trained on the same N
examples. ``--full`` adds one run of each on the whole training split. Flags this script does
not know go to ``finetune_classify`` (``--lr``, ``--layer-decay``, ``--dropout``...).

Reported per budget: dev accuracy as the mean over seeds with its standard error
(``std / sqrt(seeds)``), and the pretrained-minus-fresh difference, paired by seed (both
trained on the same N examples), with its standard error.

Writes to ``--out-dir``: ``results.jsonl`` (a line per finished run; ``--resume`` skips the
runs it already holds, so a stopped sweep continues where it stopped), ``label_curve.png``
and each fine-tuning run's folder under ``runs/``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from experiments import cli, finetune_classify, finetune_common, stdlib_text
from functional_llm import data, metrics, runs

INITS = ("pretrained", "fresh")
OUTPUTS = ("results.jsonl", "label_curve.png", "runs")
OWNED = ("--seed", "--epochs", "--train-sample", "--max-train", "--reinit", "--out-dir",
         "--overwrite", "--eval-every")  # finetune_classify flags this script sets  # fmt: skip


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    # no abbreviations: a forwarded --seed is finetune_classify's, not this script's --seeds
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter,
                                allow_abbrev=False)  # fmt: skip
    a, count = p.add_argument, cli.positive_int
    a("--pretrained", default="out/pretrain_bert", help="a pretrain_bert.py output directory")
    a("--train", help="CSV/TSV/JSONL training file (default: the stdlib docstring-kind task)")
    a("--dev", help="CSV/TSV/JSONL dev file (needed with --train)")
    a("--labels", type=count, nargs="+", default=[500, 1000, 4000], help="label budgets")
    a("--seeds", type=count, default=5, help="draws (and inits) per budget")
    a("--full", action="store_true", help="also fine-tune on the whole training split, once")
    a("--min-steps", type=count, default=300, help="fewest steps a budget's run trains")
    a("--batch-size", type=count, default=32)
    a("--full-epochs", type=count, default=2)
    a("--out-dir", default="out/low_resource")
    cli.add_run_args(p)
    a("--no-plot", action="store_true")
    args, rest = p.parse_known_args(argv)
    if bool(args.train) != bool(args.dev):
        p.error("--train and --dev go together")
    if not (Path(args.pretrained) / "bert.safetensors").is_file():
        p.error(f"--pretrained {args.pretrained}: no bert.safetensors there; make one with "
                f"python -m experiments.pretrain_bert --out-dir {args.pretrained}")  # fmt: skip
    if args.seeds < 2:
        p.error("--seeds must be >= 2: a standard error needs two draws")
    owned = sorted({f.split("=")[0] for f in rest} & set(OWNED))
    if owned:
        p.error(f"{', '.join(owned)}: set by this script for each run")
    return args, rest


def epochs_for(n: int, args: argparse.Namespace) -> int:
    """Whole epochs over ``n`` examples that make at least ``--min-steps`` steps."""
    return math.ceil(args.min_steps / math.ceil(n / args.batch_size))


def fine_tune(args: argparse.Namespace, rest: list[str], init: str, n: int | None, seed: int,
              out: Path) -> float:  # fmt: skip
    """One ``finetune_classify`` run's dev accuracy (``n=None``: the whole split)."""
    epochs = str(args.full_epochs if n is None else epochs_for(n, args))
    # scored once, after the last epoch
    flags = ["--pretrained", args.pretrained, "--seed", str(seed), "--no-plot", "--overwrite",
             "--batch-size", str(args.batch_size), "--out-dir", str(out), "--epochs", epochs,
             "--eval-every", epochs, *rest]  # fmt: skip
    if args.train:
        flags += ["--train", args.train, "--dev", args.dev]
    if init == "fresh":
        flags.append("--reinit")
    if n is not None:
        flags += ["--train-sample", str(n)]
    print(f"\n$ python -m experiments.finetune_classify {' '.join(flags)}", flush=True)
    return finetune_classify.main(flags)["accuracy"]


def naive_bayes(train: list[dict], dev: list[dict], n: int | None, seed: int) -> float:
    """Uni+bigram Naive Bayes on the run's examples: the same draw as ``--train-sample``."""
    if n is not None:
        train = finetune_common.draw(train, n, seed)
    predicted = finetune_classify.naive_bayes(train, dev, ngrams=2)
    return metrics.accuracy(predicted, [e["label"] for e in dev])


def mean_se(xs: list[float]) -> tuple[float, float]:
    """The mean and its standard error, ``stdev / sqrt(len)``."""
    return statistics.fmean(xs), statistics.stdev(xs) / math.sqrt(len(xs))


def summary(results: list[dict], budgets: list[int | None]) -> list[dict[str, Any]]:
    """Per budget: each system's mean and standard error, and the paired difference."""
    rows = []
    for n in budgets:
        at = {(r["system"], r["seed"]): r["accuracy"] for r in results if r["labels"] == n}
        seeds = sorted({s for _, s in at})
        row: dict[str, Any] = {"labels": n, "seeds": len(seeds)}
        for system in (*INITS, "naive bayes"):
            xs = [at[system, s] for s in seeds]
            row[system] = mean_se(xs) if len(xs) > 1 else (xs[0], math.nan)
        if len(seeds) > 1:
            row["gain"] = mean_se([at["pretrained", s] - at["fresh", s] for s in seeds])
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def show(m_se: tuple[float, float]) -> str:
        return f"{m_se[0]:.4f}" if math.isnan(m_se[1]) else f"{m_se[0]:.4f} ± {m_se[1]:.4f}"

    lines = ["| labels | seeds | pretrained | fresh weights | uni+bigram NB | pretrained − fresh |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        gain = f"{r['gain'][0]:+.4f} ± {r['gain'][1]:.4f}" if "gain" in r else "(one run)"
        lines.append(f"| {r['labels'] or 'all'} | {r['seeds']} | {show(r['pretrained'])} | "
                     f"{show(r['fresh'])} | {show(r['naive bayes'])} | {gain} |")  # fmt: skip
    return "\n".join(lines)


def whole_split(row: dict[str, Any], n_dev: int) -> str:
    """The better fine-tuned model against Naive Bayes on the whole training split, in units of
    the dev accuracy's standard error ``sqrt(p (1 - p) / n_dev)`` at the baseline's ``p``."""
    best = max(INITS, key=lambda system: row[system][0])
    p = row["naive bayes"][0]
    se = math.sqrt(p * (1 - p) / n_dev)
    diff = row[best][0] - p
    said = f"{diff / se:+.1f} standard errors ({se:.4f})" if se else "no standard error at p = 1"
    return (f"whole training split: {best} {row[best][0]:.4f}, uni+bigram Naive Bayes {p:.4f}: "
            f"{diff:+.4f}, {said}")  # fmt: skip


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [r for r in rows if r["labels"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    names = {"pretrained": "pretrained", "fresh": "fresh weights",
             "naive bayes": "uni+bigram Naive Bayes"}  # fmt: skip
    for system, label in names.items():
        ax.errorbar([r["labels"] for r in budgets], [r[system][0] for r in budgets],
                    yerr=[2 * r[system][1] for r in budgets], marker="o", capsize=3,
                    label=label)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("labelled training examples")
    ax.set_ylabel("dev accuracy (mean, ±2 SE over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args, rest = parse(argv)
    if args.train:
        train, dev = data.read_classification(args.train), data.read_classification(args.dev)
    else:
        train, dev = stdlib_text.classify_task()
    for n in args.labels:
        if n > len(train):
            raise data.DataError(f"--labels {n}: the training split has only {len(train):,}")
    # only once the data is known to be usable: nothing half-made
    out = runs.prepare(args.out_dir, resume=args.resume, overwrite=args.overwrite,
                       outputs=OUTPUTS)  # fmt: skip
    log = runs.MetricsLog(out / "results.jsonl", keep=sys.maxsize if args.resume else None)
    done = {(r["labels"], r["seed"], r["system"]) for r in log.records}
    cells = [(n, s) for n in args.labels for s in range(args.seeds)]
    cells += [(None, 0)] if args.full else []
    for n, seed in cells:
        for system in (*INITS, "naive bayes"):
            if (n, seed, system) in done:
                continue
            if system == "naive bayes":
                accuracy = naive_bayes(train, dev, n, seed)
            else:
                folder = out / "runs" / f"{system}_{n or 'all'}_seed{seed}"
                accuracy = fine_tune(args, rest, system, n, seed, folder)
            log.record({"labels": n, "seed": seed, "system": system, "accuracy": accuracy})
    log.close()
    budgets: list[int | None] = [*args.labels, *([None] if args.full else [])]
    rows = summary(log.records, budgets)
    if not args.no_plot:
        plot(rows, out / "label_curve.png")
    print(f"\ndev accuracy over {args.seeds} seeds ({len(dev):,} dev examples):")
    print(table(rows))
    if args.full:
        print(whole_split(rows[-1], len(dev)))
    return rows


if __name__ == "__main__":
    cli.main_guard(main)
