"""Fine-tune a sequence labeller (BIO or BIOES tags) and score entity-level F1.

    python -m experiments.finetune_tagging                              # code names in prose
    python -m experiments.finetune_tagging --pretrained out/pretrain_bert
    python -m experiments.finetune_tagging --train train.conll --dev dev.conll --scheme bioes

With no ``--train`` the task is derived from the standard library (``stdlib_text.py``): words
written as code in docstrings and reference topics (quotes removed) are ``CODE`` entities.
``--train``/``--dev`` take CoNLL files (word first, tag last, blank line between sentences),
tagged BIO. ``--scheme bioes`` trains on BIOES tags; predictions are scored in the scheme the
model was trained in, entity by entity (seqeval's definition), and per word.

Each word is labelled at its first sub-word; predictions come from the same position.
Writes ``metrics.jsonl``, ``curves.png`` and ``model.safetensors`` to ``--out-dir``.
"""

from __future__ import annotations

import argparse

import numpy as np

import functional_llm as fl
from experiments import cli, stdlib_text
from experiments import finetune_common as common
from functional_llm import data, losses, metrics, random


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train", help="CoNLL training file (default: stdlib task)")
    p.add_argument("--dev", help="CoNLL dev file (needed with --train)")
    p.add_argument("--scheme", choices=("bio", "bioes"), default="bio")
    common.add_args(p, "out/finetune_tagging", epochs=4)
    args = common.parse(p, argv)
    train_s, dev_s = common.train_dev(p, args, data.read_conll, stdlib_text.tagging_task)
    if args.scheme == "bioes":
        train_s = [(w, data.bio_to_bioes(t)) for w, t in train_s]
        dev_s = [(w, data.bio_to_bioes(t)) for w, t in dev_s]
    tags = sorted({t for _, ts in train_s for t in ts} | {"O"})
    train_s = common.budget(p, args, train_s)
    seen = {t for _, ts in [*train_s, *dev_s] for t in ts}
    schemeless = sorted(t for t in seen if not metrics.is_entity_tag(t))
    if schemeless:
        p.error(f"tags {schemeless} are not BIO/BIOES (O, B-, I-, E-, S-): entity F1 needs them")
    run = common.open_run(args)  # only once the data is known to be usable: nothing half-made
    print(f"{len(train_s):,} training and {len(dev_s):,} dev sentences; tags {tags}")

    texts = lambda: [" ".join(w) for w, _ in train_s]  # noqa: E731
    tok, backbone, pretrained = common.backbone(args, texts)
    model = fl.models.TokenClassifier(backbone, num_labels=len(tags), dropout=args.dropout)
    params = common.init_params(model, pretrained, random.key(args.seed))
    known = [(w, [t if t in tags else "O" for t in ts]) for w, ts in dev_s]  # unseen tag: miss
    train_f = data.encode_tagging(tok, train_s, tags, args.max_length)
    dev_f = data.encode_tagging(tok, known, tags, args.max_length)
    pad = common.collate(tok.id_of("pad"), ("tokens", "labels"))
    outside = tags.index("O")

    def evaluate(params) -> dict[str, float]:
        scores = common.predict(model, params, dev_f, pad, per_token=True)
        predicted, gold = [], []
        for f, s, (words, word_tags) in zip(dev_f, scores, dev_s, strict=True):
            ids = data.word_predictions(f["word_ids"], np.argmax(s, -1), len(words), outside)
            predicted.append([tags[i] for i in ids])
            gold.append(word_tags)
        flat_p = [t for ts in predicted for t in ts]
        flat_g = [t for ts in gold for t in ts]
        return {**metrics.entity_scores(predicted, gold),
                "word_accuracy": metrics.accuracy(flat_p, flat_g)}  # fmt: skip

    loss = losses.token_classification(model)
    meta = common.model_meta(tok, backbone, labels=tags, task="tag")
    _, final = common.fit(args, loss, params, model, train_f, pad, evaluate, run, meta)
    run.record({"final": True, **final})
    run.close(not args.no_plot, "f1")
    print(f"dev entity F1 {final['f1']:.4f} (precision {final['precision']:.4f}, recall "
          f"{final['recall']:.4f}); word accuracy {final['word_accuracy']:.4f}")  # fmt: skip
    return final


if __name__ == "__main__":
    cli.main_guard(main)
