"""The BERT workflow on real data, end to end: pretrain, fine-tune, score against baselines.

* **SST-2** (``--sst2 DIR`` with ``train.tsv``, ``dev.tsv``): pretrain a small BERT with
  MLM + NSP on the standard library's prose plus the SST-2 training sentences (their labels
  unused), fine-tune it on ``train.tsv``, and score dev accuracy next to a bag-of-words Naive
  Bayes baseline on the same split; then the same fine-tuning from a fresh backbone (no
  pretraining), to show what pretraining adds.
* **SQuAD 2.0** (``--squad FILE``): pretrain on the stdlib prose plus the file's contexts,
  fine-tune on 4 of every 5 articles, score EM / F1 on the 5th, next to the baseline that
  always answers "no answer".

Each stage is the experiment script's ``main`` with the flags printed beside it; runs are
sequential (on 2 cores two torch processes at once slow each other down many-fold).

    python -m benchmarks.bert_real_data --sst2 DIR_WITH_TRAIN_AND_DEV_TSV \\
        --squad SQUAD_V2_JSON
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path


def run(name: str, flags: list[str]) -> dict:
    """One experiment; its folder under ``--out-dir`` is this benchmark's, replaced each time."""
    flags = [*flags, "--overwrite"]
    print(f"\n$ python -m experiments.{name} {' '.join(flags)}", flush=True)
    return importlib.import_module(f"experiments.{name}").main(flags)


def sst2(folder: Path, out: Path, steps: int, extra: list[str]) -> list[str]:
    model = ["--max-length", "64", "--d-model", "128", "--n-layers", "4", "--n-heads", "4",
             "--d-ff", "512"]  # fmt: skip
    pre = run("pretrain_bert", ["--data", str(folder / "train.tsv"), "--with-stdlib",
                                "--max-steps", str(steps), "--out-dir", str(out / "pretrain_sst2"),
                                *model[:2]])  # fmt: skip
    task = ["--train", str(folder / "train.tsv"), "--dev", str(folder / "dev.tsv"),
            "--epochs", "2", "--lr", "2e-4", *extra]  # fmt: skip
    tuned = run("finetune_classify", [*task, "--pretrained", str(out / "pretrain_sst2"),
                                      "--out-dir", str(out / "finetune_sst2")])  # fmt: skip
    fresh = run("finetune_classify", [*task, *model, "--vocab-size", "8000",
                                      "--out-dir", str(out / "finetune_sst2_fresh")])  # fmt: skip
    return [
        f"| SST-2 dev accuracy, pretrained ({steps} steps, MLM {pre['val_mlm_loss']:.2f}) | "
        f"{tuned['accuracy']:.4f} | Naive Bayes {tuned['nb_accuracy']:.4f} |",
        f"| SST-2 dev accuracy, fresh backbone | {fresh['accuracy']:.4f} | "
        f"Naive Bayes {fresh['nb_accuracy']:.4f} |",
    ]


def squad(path: Path, out: Path, steps: int, extra: list[str]) -> list[str]:
    run("pretrain_bert", ["--data", str(path), "--with-stdlib", "--max-steps", str(steps),
                          "--out-dir", str(out / "pretrain_squad")])  # fmt: skip
    result = run("finetune_qa", ["--pretrained", str(out / "pretrain_squad"), "--train", str(path),
                                 "--holdout-every", "5", "--epochs", "5", "--max-length", "128",
                                 "--out-dir", str(out / "finetune_squad"), *extra])  # fmt: skip
    return [
        f"| SQuAD 2.0 sample, held-out article: EM / F1 | {result['exact']:.2f} / "
        f"{result['f1']:.2f} | always no-answer EM {result['no_answer_exact']:.2f} |",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sst2", type=Path, help="folder with SST-2 train.tsv and dev.tsv")
    p.add_argument("--squad", type=Path, help="a SQuAD v2.0 JSON file")
    p.add_argument("--pretrain-steps", type=int, default=2000)
    p.add_argument("--max-train", type=int, help="fine-tune on the first N examples (a smoke run)")
    p.add_argument("--out-dir", type=Path, default=Path("out/bert_real_data"))
    args = p.parse_args()
    extra = [] if args.max_train is None else ["--max-train", str(args.max_train)]
    rows = ["| run | ours | baseline |", "|---|---|---|"]
    if args.sst2:
        rows += sst2(args.sst2, args.out_dir, args.pretrain_steps, extra)
    if args.squad:
        rows += squad(args.squad, args.out_dir, args.pretrain_steps // 2, extra)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
