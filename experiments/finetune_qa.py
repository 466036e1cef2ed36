"""Fine-tune extractive question answering (SQuAD v1.1 / v2.0) and score exact match and F1.

    python -m experiments.finetune_qa                                   # stdlib cloze questions
    python -m experiments.finetune_qa --pretrained out/pretrain_bert \\
        --train squad/dev-v2.0-sample.json --holdout-every 5            # split one file
    python -m experiments.finetune_qa --train train-v2.0.json --dev dev-v2.0.json

With no ``--train`` the task is derived from the standard library (``stdlib_text.py``): cloze
questions over runs of documentation sentences, half of them unanswerable. ``--train`` takes a
SQuAD JSON file; ``--dev`` another, or ``--holdout-every K`` scores on every K-th article of
the training file and trains on the rest.

Contexts longer than ``--max-length`` are split into windows ``--doc-stride`` tokens apart;
answers are read back from the best-scoring window as text spans of the context. Scored with
the official SQuAD v2.0 definitions (:func:`functional_llm.metrics.squad_scores`), next to the
baseline that always answers "no answer".
"""

from __future__ import annotations

import argparse

import functional_llm as fl
from experiments import cli, stdlib_text
from experiments import finetune_common as common
from functional_llm import data, losses, metrics, random


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train", help="SQuAD JSON training file (default: stdlib cloze task)")
    p.add_argument("--dev", help="SQuAD JSON dev file")
    p.add_argument("--holdout-every", type=cli.positive_int, default=None,
                   help="score on every K-th article of --train instead of --dev")  # fmt: skip
    p.add_argument("--doc-stride", type=cli.positive_int, default=64)
    p.add_argument("--max-query", type=cli.positive_int, default=32)
    p.add_argument("--max-answer-tokens", type=cli.positive_int, default=30)
    common.add_args(p, "out/finetune_qa", epochs=3)
    p.set_defaults(max_length=192)
    args = common.parse(p, argv)
    if args.train and bool(args.dev) == bool(args.holdout_every):
        p.error("--train needs either --dev or --holdout-every")
    if args.holdout_every == 1:
        p.error("--holdout-every 1 would hold out every article and train on none; use >= 2")
    if args.train and args.dev:
        train_ex, dev_ex = data.read_squad(args.train), data.read_squad(args.dev)
    elif args.train:
        every = args.holdout_every
        both = data.read_squad(args.train)
        train_ex = [e for e in both if e.article % every != every - 1]
        dev_ex = [e for e in both if e.article % every == every - 1]
    else:
        train_ex, dev_ex = stdlib_text.qa_task()  # one dev set for every --seed
    train_ex = common.budget(p, args, train_ex)
    run = common.open_run(args)  # once the data is known to be usable: nothing half-made
    n_impossible = sum(e.impossible for e in dev_ex)
    print(f"{len(train_ex):,} training and {len(dev_ex):,} dev questions "
          f"({n_impossible} of the dev questions unanswerable)")  # fmt: skip

    texts = lambda: list({e.context for e in train_ex}) + [e.question for e in train_ex]  # noqa: E731
    tok, backbone, pretrained = common.backbone(args, texts)
    model = fl.models.ExtractiveQA(backbone, dropout=args.dropout)
    params = common.init_params(model, pretrained, random.key(args.seed))
    featurize = lambda ex: data.qa_features(tok, ex, args.max_length, args.doc_stride,  # noqa: E731
                                            args.max_query)  # fmt: skip
    train_f, dev_f = featurize(train_ex), featurize(dev_ex)
    pad = common.collate(tok.id_of("pad"), ("tokens", "token_types", "start", "end"))
    no_answer = metrics.squad_scores(dev_ex, {e.id: "" for e in dev_ex})

    def evaluate(params) -> dict[str, float]:
        spans = common.predict(model, params, dev_f, pad, per_token=True)
        answers = data.predict_answers(
            dev_ex, dev_f, [s for s, _ in spans], [e for _, e in spans],
            max_answer_tokens=args.max_answer_tokens,
        )  # fmt: skip
        scores = metrics.squad_scores(dev_ex, answers)
        # Forced to answer (no "no answer"), on the answerable questions: whether the model
        # locates answers at all, even where its no-answer score wins above.
        forced = data.predict_answers(
            dev_ex, dev_f, [s for s, _ in spans], [e for _, e in spans],
            max_answer_tokens=args.max_answer_tokens, null_threshold=None,
        )  # fmt: skip
        answerable = [e for e in dev_ex if not e.impossible]
        out = {k: float(v) for k, v in scores.items() if not k.endswith("total")}
        if answerable:
            out["HasAns_f1_forced"] = metrics.squad_scores(answerable, forced)["f1"]
        return out

    print(f"{len(train_f):,} training windows, {len(dev_f):,} dev windows")
    meta = common.model_meta(tok, backbone, task="qa")
    _, final = common.fit(args, losses.qa_span(model), params, model, train_f, pad, evaluate, run,
                          meta)  # fmt: skip
    run.record({"final": True, **final, "no_answer_exact": no_answer["exact"]})
    run.close(not args.no_plot, "f1")
    print(f"dev exact match {final['exact']:.2f}, F1 {final['f1']:.2f} "
          f"(answerable: EM {final.get('HasAns_exact', float('nan')):.2f}, "
          f"F1 {final.get('HasAns_f1', float('nan')):.2f}; unanswerable: "
          f"{final.get('NoAns_exact', float('nan')):.2f}; answerable, forced to answer: "
          f"F1 {final.get('HasAns_f1_forced', float('nan')):.2f}); always 'no answer': "
          f"EM {no_answer['exact']:.2f}")  # fmt: skip
    return {**final, "no_answer_exact": no_answer["exact"]}


if __name__ == "__main__":
    cli.main_guard(main)
