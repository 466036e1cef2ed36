"""Pretrain a small BERT with masked-language modelling and next-sentence prediction.

    python -m experiments.pretrain_bert                                 # stdlib English prose
    python -m experiments.pretrain_bert --data book.txt --data notes.txt
    python -m experiments.pretrain_bert --data sst2/train.tsv --with-stdlib
    python -m experiments.pretrain_bert --resume                        # continue the last run

With no ``--data`` the corpus is the standard library's documentation prose
(``stdlib_text.py``: docstrings and the language reference topics; a module or a topic is a
document). A ``.txt`` file holds documents separated by blank lines; in a ``.tsv``, ``.csv`` or
``.jsonl`` file each row's text is a document of one segment; in a SQuAD ``.json`` file each
context paragraph is a document (questions and answers unused). Every 10th document is held
out.

Each document's sentences are packed into segments of at most ``(max_length - 3) / 2`` tokens.
Each epoch pairs consecutive segments ``[CLS] a [SEP] b [SEP]``, replacing b by a segment of
another document half of the time (NSP; :func:`functional_llm.data.nsp_pairs`); documents of
one segment give ``[CLS] a [SEP]`` examples that train MLM only. Each step masks its batch
with a key of its own (15 %, 80/10/10; ``--whole-word``), and the batch order is a pure
function of ``(seed, epoch)``, so ``--resume`` continues with exactly the batches and masks the
uninterrupted run would have used.

Writes to ``--out-dir``: ``tokenizer.json`` and ``bert.safetensors`` (params; config in the
metadata) for the fine-tuning scripts' ``--pretrained``, ``metrics.jsonl``, ``loss.png`` and
``checkpoints/``. Prints the held-out MLM loss, perplexity and accuracy and the NSP accuracy.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import functional_llm as fl
from experiments import cli, stdlib_text
from experiments import finetune_common as common
from functional_llm import checkpoint, data, losses, metrics, optim, random, runs, train
from functional_llm.losses import IGNORE


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    count = cli.positive_int
    a("--data", action="append", default=[], help="text/TSV/CSV/JSONL/SQuAD file (repeatable)")
    a("--with-stdlib", action="store_true", help="add the stdlib prose to --data")
    a("--vocab-size", type=count, default=8000)
    a("--tokenizer", help="a saved tokenizer.json to use instead of training one")
    common.add_model_args(p)
    a("--batch-size", type=count, default=32)
    a("--max-steps", type=count, default=1000)
    a("--lr", type=cli.positive_float, default=1e-3)
    a("--warmup", type=cli.nonnegative_int, default=100)
    a("--decay-steps", type=count, default=None, help="cosine schedule length (default: max-steps)")
    a("--weight-decay", type=cli.nonnegative_float, default=0.01)
    a("--mask-rate", type=cli.rate, default=0.15)
    a("--whole-word", action="store_true", help="mask every piece of a chosen word")
    a("--nsp-weight", type=cli.nonnegative_float, default=1.0)
    a("--eval-interval", type=count, default=250)
    a("--eval-batches", type=count, default=20)
    a("--ckpt-interval", type=count, default=500)
    cli.add_run_args(p)
    a("--seed", type=cli.nonnegative_int, default=0)
    a("--threads", type=count, default=None)
    a("--out-dir", default="out/pretrain_bert")
    a("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.mask_rate == 0:
        p.error("--mask-rate must be > 0: masked-language modelling needs masked tokens")
    if args.max_length < 5:  # [CLS] a [SEP] b [SEP] with one token per segment
        p.error(f"--max-length {args.max_length} leaves no room for two segments; use >= 5")
    common.check_model_args(p, args, "bert")
    return args


def read_documents(args: argparse.Namespace) -> tuple[list[list[str]], list[list[str]]]:
    """``(train, held_out)`` documents as lists of sentences."""
    if not args.data:
        return stdlib_text.documents()
    docs: list[list[str]] = []
    for path in map(Path, args.data):
        if path.suffix.lower() in (".tsv", ".csv", ".jsonl"):
            docs += [[e["text"]] for e in data.read_classification(path)]
        elif path.suffix.lower() == ".json":  # SQuAD: each distinct context is a document
            contexts = dict.fromkeys(e.context for e in data.read_squad(path))
            docs += [stdlib_text.sentences(c) for c in contexts]
        else:
            text = data.read_text(path)
            docs += [stdlib_text.sentences(block) for block in text.split("\n\n")]
    docs = [d for d in docs if d]
    train_docs = [d for i, d in enumerate(docs) if i % 10 != 9]
    held = [d for i, d in enumerate(docs) if i % 10 == 9]
    if args.with_stdlib:
        more_train, more_held = stdlib_text.documents()
        train_docs, held = train_docs + more_train, held + more_held
    if len(held) < 2:
        files = ", ".join(args.data)
        raise data.DataError(
            f"{files}: {len(docs)} documents (of 4+ word sentences) hold out {len(held)} for "
            "evaluation; give at least 20"
        )
    return train_docs, held


def segments(tok: Any, docs: list[list[str]], budget: int) -> list[list[data.Encoded]]:
    """Each document's sentences packed greedily into segments of at most ``budget`` tokens."""
    out = []
    for doc in docs:
        packed, current = [], []
        for sentence in doc:
            enc = tok.tokenize(sentence).take(slice(0, budget))
            if current and sum(map(len, current)) + len(enc) > budget:
                packed.append(current)
                current = []
            current.append(enc)
        if current:
            packed.append(current)
        out.append([data.Encoded.join(parts) for parts in packed])
    return out


def examples(tok: Any, docs: list[list[data.Encoded]], key: torch.Tensor) -> list[dict]:
    """NSP pairs from documents of 2+ segments; single-segment documents give MLM-only rows."""
    cls, sep = tok.id_of("cls"), tok.id_of("sep")
    rows = []
    pairs = data.nsp_pairs(key, docs) if sum(len(d) > 1 for d in docs) else []
    singles = [(d[0], None, IGNORE) for d in docs if len(d) == 1]
    for a, b, label in pairs + singles:
        pieces = [[cls], a.ids, [sep]] + ([] if b is None else [b.ids, [sep]])
        starts = [[False], a.word_starts, [False]]
        starts += [] if b is None else [b.word_starts, [False]]
        n_a = len(a) + 2
        ids = np.concatenate(pieces)
        rows.append({
            "tokens": ids, "token_types": (np.arange(len(ids)) >= n_a).astype(np.int64),
            "word_starts": np.concatenate(starts).astype(bool), "nsp_label": label,
        })  # fmt: skip
    return rows


def masked(batch: dict, key: torch.Tensor, tok: Any, args: argparse.Namespace) -> dict:
    special = torch.isin(batch["tokens"], torch.tensor(tok.special_ids))
    inputs, labels = data.mask_tokens(
        key, batch["tokens"], protected=special | ~batch["valid"], mask_id=tok.id_of("mask"),
        vocab_size=tok.vocab_size, special_ids=tok.special_ids, rate=args.mask_rate,
        word_starts=batch["word_starts"] if args.whole_word else None,
    )  # fmt: skip
    # BERT's layout: the masked positions first in each row, so the vocabulary projection (the
    # costliest matmul) runs on those P positions only; unused slots keep the IGNORE label.
    selected = labels != IGNORE
    width = max(int(selected.sum(-1).max()), 1)
    positions = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True)[:, :width]
    out = {k: v for k, v in batch.items() if k != "word_starts"}
    return {
        **out,
        "tokens": inputs,
        "mlm_positions": positions,
        "labels": labels.gather(-1, positions),
    }


OUTPUTS = ("checkpoints", "metrics.jsonl", "tokenizer.json", "bert.safetensors", "curves.png")


def build(args: argparse.Namespace, tok: Any) -> tuple[Any, Any, Any, train.TrainState]:
    """``(config, model, optimizer, fresh state)`` for a tokenizer's vocabulary."""
    cfg = fl.models.BERTConfig(**common.model_fields(args, tok.vocab_size))
    model = fl.models.BERT(cfg)
    decay_steps = args.decay_steps or args.max_steps
    schedule = optim.warmup_cosine(args.lr, min(args.warmup, decay_steps - 1), decay_steps)
    decay = lambda p: fl.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731
    opt = optim.inject_hyperparams(optim.adamw)(
        schedule, weight_decay=args.weight_decay, mask=decay
    )
    k_init, k_train = random.split(random.key(args.seed), 6)[:2]
    return cfg, model, opt, train.init_state(model.init(k_init), opt, k_train)


def tokenizer(args: argparse.Namespace, out: Path, train_docs: list[list[str]]) -> Any:
    """A fresh run's tokenizer, saved to ``out``: ``--tokenizer``'s, or one trained on the
    training documents. (WordPiece training is not reproducible across processes,
    huggingface/tokenizers#1794, so a run keeps its tokenizer: in the folder and in each
    checkpoint.)"""
    if args.tokenizer:
        tok = data.load_tokenizer(args.tokenizer)
    else:
        tok = data.SubwordTokenizer.train((s for d in train_docs for s in d), args.vocab_size)
    tok.save(out / "tokenizer.json")
    return tok


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = runs.prepare(args.out_dir, resume=args.resume, overwrite=args.overwrite, outputs=OUTPUTS)
    train_docs, held_docs = read_documents(args)
    ckpts = checkpoint.Checkpointer(out / "checkpoints", keep=2)
    restored, tok = None, None
    if args.resume:  # the state's template comes from the checkpoint's own tokenizer
        template = lambda tok: {"state": build(args, tok)[3]}  # noqa: E731
        restored, tok = cli.resume_with_tokenizer(ckpts, out / "tokenizer.json", template)
    if tok is None:
        tok = tokenizer(args, out, train_docs)
    budget = (args.max_length - 3) // 2
    train_segs, held_segs = segments(tok, train_docs, budget), segments(tok, held_docs, budget)

    cfg, model, opt, state = build(args, tok)
    if restored is not None:
        state = restored.state["state"]
    where = cli.device(args)
    state = cli.to_device(state, where)
    loss_fn = losses.bert_pretraining(model, args.nsp_weight)
    step = cli.loop_step(loss_fn, opt, args, where)
    eval_mlm = cli.on_device(train.make_eval_step(losses.mlm(model)), where)
    eval_nsp = cli.on_device(train.make_eval_step(losses.nsp(model)), where)

    _, _, k_pairs, k_order, k_mask, k_eval = random.split(random.key(args.seed), 6)
    pad = functools.partial(data.pad_batch, pad_values={"tokens": tok.id_of("pad")})
    # Held-out NSP pairs (and MLM on them); a corpus without multi-segment documents (e.g. one
    # sentence per row) evaluates MLM on its single segments and has no NSP score.
    held_all = examples(tok, held_segs, k_eval)
    has_pairs = any(r["nsp_label"] != IGNORE for r in held_all)
    held_rows = [r for r in held_all if r["nsp_label"] != IGNORE or not has_pairs]
    held_rows = held_rows[: args.eval_batches * args.batch_size]
    held_batches = [
        masked(pad(held_rows[i : i + args.batch_size]), random.fold_in(k_eval, i), tok, args)
        for i in range(0, len(held_rows), args.batch_size)
    ]
    per_epoch = len(examples(tok, train_segs, random.fold_in(k_pairs, 0)))
    batches_per_epoch = -(-per_epoch // args.batch_size)
    n_sentences, n_params = sum(map(len, train_docs)), fl.tree.size(state.params)
    print(f"{n_sentences:,} training sentences in {len(train_docs):,} documents ({per_epoch:,} "
          f"examples per epoch), vocab {tok.vocab_size}; {n_params:,} parameters; "
          f"steps {int(state.step)}..{args.max_steps}")  # fmt: skip

    run = common.Run(out, keep=restored.metadata.get("metrics_records") if restored else None)
    guard = cli.Guard(args.skip_nonfinite)

    def evaluation(at: int) -> dict:
        guard.check()
        mlm = train.evaluate(eval_mlm, state.params, held_batches)
        entry = {"step": at, "val_mlm_loss": mlm["nll"], "val_mlm_accuracy": mlm["accuracy"],
                 "val_perplexity": metrics.perplexity(mlm["nll"])}  # fmt: skip
        if has_pairs:
            entry["val_nsp_accuracy"] = train.evaluate(eval_nsp, state.params, held_batches)[
                "accuracy"
            ]
        run.record(entry)
        return entry

    meta = {"config": checkpoint.config_to_dict(cfg), "args": vars(args),
            "tokenizer": tok.to_json()}  # fmt: skip

    def save(at: int, records: int | None = None) -> Path:
        guard.check()  # a diverged state is never written
        kept = len(run.records) if records is None else records
        return ckpts.save(at, {"state": state}, {**meta, "metrics_records": kept})

    bar = tqdm(total=args.max_steps, initial=int(state.step), mininterval=1)
    train_started = time.perf_counter()
    with runs.interruptible() as stop:
        while int(state.step) < args.max_steps:
            epoch, position = divmod(int(state.step), batches_per_epoch)
            rows = examples(tok, train_segs, random.fold_in(k_pairs, epoch))
            order = data.BatchOrder(len(rows), args.batch_size, k_order, epoch=epoch,
                                    start=position, lengths=[len(r["tokens"]) for r in rows],
                                    bucket=50)  # fmt: skip
            for index in order:
                at = int(state.step)
                if at >= args.max_steps:
                    break
                if at % args.eval_interval == 0:
                    e = evaluation(at)
                    bar.set_postfix(mlm=f"{e['val_mlm_loss']:.3f}", nsp=e.get("val_nsp_accuracy"))
                batch = masked(pad([rows[i] for i in index]), random.fold_in(k_mask, at), tok, args)
                state, m = step(state, batch)
                guard.watch(at + 1, m)
                bar.update()
                if (at + 1) % 10 == 0:
                    guard.check()
                    run.record({"step": at + 1, **{k: float(v) for k, v in m.items()}})
                if (at + 1) % args.ckpt_interval == 0:
                    save(at + 1)
                if stop and at + 1 < args.max_steps:
                    cli.leave(stop, at + 1, save, bar)
    bar.close()
    train_seconds = time.perf_counter() - train_started
    trained = len(run.records)  # the final evaluation comes after
    final = evaluation(args.max_steps)
    save(args.max_steps, trained)
    checkpoint.save(out / "bert.safetensors", state.params, meta)
    run.close(not args.no_plot, "val_mlm_loss")
    nsp = final.get("val_nsp_accuracy")
    nsp_text = "n/a (no multi-segment documents)" if nsp is None else f"{nsp:.4f}"
    print(f"held-out MLM loss {final['val_mlm_loss']:.4f} (perplexity "
          f"{final['val_perplexity']:.1f}, accuracy {final['val_mlm_accuracy']:.4f}); "
          f"NSP accuracy {nsp_text}")  # fmt: skip
    total = time.perf_counter() - started
    print(f"wall time {total:.1f} s (training loop {train_seconds:.1f} s); outputs in {out}")
    return {**final, "wall_s": total, "train_s": train_seconds}


if __name__ == "__main__":
    cli.main_guard(main)
