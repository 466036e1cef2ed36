"""What the translation and summarisation experiments share: flags, a subword vocabulary for
both sides, the encoder-decoder Transformer trained with label smoothing (checkpoints, resume,
interrupts and the divergence guard of ``experiments/cli.py``), and an evaluation of greedy
and beam-search outputs next to the task's baselines on the same held-out pairs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import functional_llm as fl
from experiments import cli
from experiments import finetune_common as common
from functional_llm import checkpoint, data, losses, optim, random, runs, train
from functional_llm import generate as G

Pair = tuple[str, str]
Metric = Callable[[Sequence[str], Sequence[str]], dict[str, Any]]
OUTPUTS = ("checkpoints", "metrics.jsonl", "tokenizer.json", "curves.png", "samples.txt")


def add_args(p: argparse.ArgumentParser, out_dir: str, max_source: int, max_target: int) -> None:
    a, count = p.add_argument, cli.positive_int
    a("--train", help="a .tsv/.jsonl/.po/.mo file of pairs (default: the task's own corpus)")
    a("--dev", help="held-out pairs (needed with --train)")
    a("--source-field", default="source", help="JSONL: the source's field")
    a("--target-field", default="target", help="JSONL: the target's field")
    a("--vocab-size", type=count, default=4000, help="one byte-level BPE for both sides")
    a("--max-source", type=count, default=max_source)
    a("--max-target", type=count, default=max_target)
    a("--d-model", type=count, default=256)
    a("--layers", type=count, default=3, help="encoder and decoder layers each")
    a("--heads", type=count, default=4)
    a("--d-ff", type=count, default=1024)
    a("--dropout", type=cli.rate, default=0.0,
      help="0 by default: keyed dropout makes a CPU step about 1.5x slower; in four minutes "
           "the translator reached a held-out loss of 4.00 without it, 4.94 with 0.1")  # fmt: skip
    a("--copy-source", action=argparse.BooleanOptionalAction, default=False,
      help="a pointer-generator copy head: the decoder may copy source tokens (names, "
           "numbers, format specifiers) as well as generate them")  # fmt: skip
    a("--batch-size", type=count, default=64)
    a("--max-steps", type=count, default=4000)
    a("--lr", type=cli.positive_float, default=2e-3)
    a("--warmup", type=cli.nonnegative_int, default=400)
    a("--label-smoothing", type=cli.rate, default=0.1)
    a("--eval-interval", type=count, default=1000)
    a(
        "--eval-size",
        type=count,
        default=500,
        help="held-out pairs scored at the end (a fixed random sample)",
    )
    a("--num-beams", type=count, default=4)
    a("--ckpt-interval", type=count, default=1000)
    a("--average", type=count, default=1,
      help="score and translate with the mean params of the newest N checkpoints (fairseq's "
           "average_checkpoints.py); 1: the last")  # fmt: skip
    a("--seed", type=cli.nonnegative_int, default=0)
    a("--threads", type=count, default=None)
    cli.add_device_args(p)
    a("--out-dir", default=out_dir)
    cli.add_run_args(p)
    a("--no-plot", action="store_true")


def config(args: argparse.Namespace, vocab: int) -> fl.models.TransformerConfig:
    return fl.models.TransformerConfig(
        src_vocab_size=vocab, tgt_vocab_size=vocab, d_model=args.d_model, nhead=args.heads,
        num_encoder_layers=args.layers, num_decoder_layers=args.layers,
        dim_feedforward=args.d_ff, dropout=args.dropout, norm_first=True,
        copy_source=args.copy_source,
        max_seq_len=max(args.max_source, args.max_target), tie_output=False,
        embed_std=args.d_model**-0.5, dtype=cli.dtype(args),
    )  # fmt: skip


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if bool(args.train) != bool(args.dev):
        p.error("--train and --dev go together")
    try:
        config(args, vocab=300)
    except ValueError as err:
        p.error(f"the model flags do not make a valid model: {err}")


def build(args: argparse.Namespace, tok: Any) -> tuple[Any, Any, Any, train.TrainState]:
    """``(config, model, optimizer, fresh state)``: AdamW (0.98, weight decay on matrices),
    linear warmup then cosine decay to a tenth, as for the article's Transformer."""
    cfg = config(args, tok.vocab_size)
    model = fl.models.Transformer(cfg)
    schedule = optim.warmup_cosine(args.lr, min(args.warmup, args.max_steps - 1), args.max_steps,
                                   end_value=args.lr / 10)  # fmt: skip
    decay = lambda p: fl.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731
    opt = optim.inject_hyperparams(optim.adamw)(schedule, b2=0.98, weight_decay=0.01, mask=decay)
    k_init, k_train = random.split(random.key(args.seed), 2)
    return cfg, model, opt, train.init_state(model.init(k_init), opt, k_train)


def encode(tok: Any, pairs: Sequence[Pair], args: argparse.Namespace) -> list[tuple]:
    return [(tok.encode(s)[: args.max_source], tok.encode(t)[: args.max_target - 1])
            for s, t in pairs if s.strip()]  # fmt: skip


def eval_sample(pairs: Sequence[Pair], size: int) -> list[Pair]:
    """``size`` of the held-out pairs drawn at random, the same ones for every run and seed:
    the held-out split lists whole catalogs (modules) one after another, so its first pairs
    would all come from one or two of them."""
    chosen = random.permutation(random.key(0), len(pairs))[:size].tolist()
    return [pairs[i] for i in chosen]


def generate(model: Any, params: Any, tok: Any, sources: Sequence[str], args: argparse.Namespace,
             beams: int) -> list[str]:  # fmt: skip
    """Greedy (``beams=1``) or beam-search outputs for ``sources``, in batches."""
    eos = tok.id_of("eos")
    out = []
    for at in range(0, len(sources), 64):
        chunk = [(tok.encode(s)[: args.max_source] if s.strip() else [eos], [eos])
                 for s in sources[at : at + 64]]  # fmt: skip
        where = fl.tree.leaves(params)[0].device
        batch = cli.to_device(
            data.seq2seq_batch(chunk, pad_id=tok.id_of("pad"), bos_id=eos, eos_id=eos), where
        )
        start = torch.full((len(chunk), 1), eos, device=where)
        if beams == 1:
            result = G.generate(model, params, start, src=batch["src"],
                                src_valid=batch["src_valid"], max_new_tokens=args.max_target - 1,
                                eos_id=eos)  # fmt: skip
            rows = [r[ok][1:].tolist() for r, ok in zip(result.tokens, result.valid, strict=True)]
        else:
            found = G.beam_search(model, params, start, src=batch["src"],
                                  src_valid=batch["src_valid"], num_beams=beams,
                                  max_new_tokens=args.max_target - 1, eos_id=eos)  # fmt: skip
            rows = [r[0][ok[0]].tolist() for r, ok in zip(found.tokens, found.valid, strict=True)]
        out += [tok.decode([i for i in row if i != eos]).strip() for row in rows]
    return out


def run(
    args: argparse.Namespace,
    corpus: Callable[[], tuple[list[Pair], list[Pair]]],
    baselines: dict[str, Callable[[list[Pair], list[Pair]], list[str]]],
    metric: Metric,
    headline: str,
) -> dict[str, Any]:
    """Train on the task's pairs (``--train/--dev`` or ``corpus()``), then score greedy and
    beam outputs and each baseline with ``metric`` on ``--eval-size`` held-out pairs
    (:func:`eval_sample`); ``headline`` names the metric's main figure."""
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = runs.prepare(args.out_dir, resume=args.resume, overwrite=args.overwrite, outputs=OUTPUTS)
    if args.train:
        fields = {"source": args.source_field, "target": args.target_field}
        train_pairs = data.read_parallel(args.train, **fields)
        dev_pairs = data.read_parallel(args.dev, **fields)
    else:
        train_pairs, dev_pairs = corpus()
    ckpts = checkpoint.Checkpointer(out / "checkpoints", keep=max(2, args.average))
    restored, tok = None, None
    if args.resume:
        template = lambda tok: {"state": build(args, tok)[3]}  # noqa: E731
        restored, tok = cli.resume_with_tokenizer(ckpts, out / "tokenizer.json", template)
    if tok is None:
        texts = [t for pair in train_pairs for t in pair]
        tok = data.SubwordTokenizer.train(texts, args.vocab_size, kind="bpe")
        tok.save(out / "tokenizer.json")
    cfg, model, opt, state = build(args, tok)
    if restored is not None:
        state = restored.state["state"]
    where = cli.device(args)
    state = cli.to_device(state, where)
    examples = encode(tok, train_pairs, args)
    pad, eos = tok.id_of("pad"), tok.id_of("eos")
    loss_fn = losses.seq2seq(model, label_smoothing=args.label_smoothing)
    step = cli.loop_step(loss_fn, opt, args, where)
    print(f"{len(train_pairs):,} training and {len(dev_pairs):,} held-out pairs; vocab "
          f"{tok.vocab_size}; {fl.tree.size(state.params):,} parameters; steps "
          f"{int(state.step)}..{args.max_steps}")  # fmt: skip
    kept = restored.metadata.get("metrics_records") if restored else None
    log, guard = common.Run(out, keep=kept), cli.Guard(args.skip_nonfinite)
    held = eval_sample(dev_pairs, args.eval_size)
    meta = {
        "config": checkpoint.config_to_dict(cfg),
        "args": vars(args),
        "tokenizer": tok.to_json(),
    }
    dev_batch = data.seq2seq_batch(encode(tok, held[:256], args), pad_id=pad, bos_id=eos,
                                   eos_id=eos)  # fmt: skip
    eval_step = cli.on_device(train.make_eval_step(loss_fn), where)

    def save(at: int, records: int | None = None) -> Path:
        guard.check()
        kept = len(log.records) if records is None else records
        return ckpts.save(at, {"state": state}, {**meta, "metrics_records": kept})

    per_epoch = -(-len(examples) // args.batch_size)
    bar = tqdm(total=args.max_steps, initial=int(state.step), mininterval=1)
    k_order = random.fold_in(random.key(args.seed), 7)
    train_started = time.perf_counter()
    with runs.interruptible() as stop:
        while int(state.step) < args.max_steps:
            epoch, position = divmod(int(state.step), per_epoch)
            order = data.BatchOrder(len(examples), args.batch_size, k_order, epoch=epoch,
                                    start=position, lengths=[len(s) + len(t) for s, t in examples],
                                    bucket=100)  # fmt: skip
            for index in order:
                at = int(state.step)
                if at >= args.max_steps:
                    break
                batch = data.seq2seq_batch([examples[i] for i in index], pad_id=pad, bos_id=eos,
                                           eos_id=eos)  # fmt: skip
                state, m = step(state, batch)
                guard.watch(at + 1, m)
                bar.update()
                if (at + 1) % 50 == 0:
                    guard.check()
                    log.record({"step": at + 1, **{k: float(v) for k, v in m.items()}})
                    bar.set_postfix(loss=f"{float(m['loss']):.3f}")
                if (at + 1) % args.eval_interval == 0:
                    guard.check()
                    dev = eval_step(state.params, dev_batch)
                    log.record({"step": at + 1, "dev_loss": float(dev["nll"]),
                                "dev_accuracy": float(dev["accuracy"])})  # fmt: skip
                if (at + 1) % args.ckpt_interval == 0:
                    save(at + 1)
                if stop and at + 1 < args.max_steps:
                    cli.leave(stop, at + 1, save, bar)
    bar.close()
    train_seconds = time.perf_counter() - train_started
    save(args.max_steps)
    evaluated = fl.nn.inference(model)
    params = averaged(ckpts, model, args.average, state.params, args.max_steps)
    if args.average > 1:
        print(f"scoring the mean params of the checkpoints at {ckpts.steps()[-args.average :]}")
    sources, references = [s for s, _ in held], [t for _, t in held]
    outputs = {"greedy": generate(evaluated, params, tok, sources, args, 1),
               f"beam {args.num_beams}": generate(evaluated, params, tok, sources, args,
                                                  args.num_beams)}  # fmt: skip
    outputs |= {f"baseline: {name}": make(train_pairs, held) for name, make in baselines.items()}
    scores = {name: metric(hyps, references) for name, hyps in outputs.items()}
    log.record({"step": args.max_steps, "final": True, **{k: v for k, v in scores.items()}})
    log.close(not args.no_plot, "dev_loss")
    lines = [f"source:    {s}\nreference: {r}\ngreedy:    {g}\nbeam:      {b}\n"
             for s, r, g, b in zip(sources[:8], references, outputs["greedy"],
                                   outputs[f"beam {args.num_beams}"], strict=False)]  # fmt: skip
    (out / "samples.txt").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines[:4]))
    print(f"| on {len(held)} held-out pairs | " + " | ".join(scores[next(iter(scores))]) + " |")
    for name, score in scores.items():
        print(f"| {name} | " + " | ".join(_fmt(v) for v in score.values()) + " |")
    total = time.perf_counter() - started
    print(f"{fl.tree.size(state.params):,} parameters; wall time {total:.0f} s (training "
          f"{train_seconds:.0f} s); outputs in {out}")  # fmt: skip
    return {name: s[headline] for name, s in scores.items()} | {"wall_s": total}


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def use_trained(args: argparse.Namespace, sources: Sequence[str]) -> list[str]:
    """Outputs of the model a previous run left in ``--out-dir`` (its newest intact checkpoint,
    config and tokenizer), by beam search."""
    restored = cli.newest_checkpoint(Path(args.out_dir), "; train a model there first")
    ckpts = checkpoint.Checkpointer(Path(args.out_dir) / "checkpoints")
    model, params, tok = trained(restored, "the checkpoint")
    n = restored.metadata["args"].get("average", 1)
    params = averaged(ckpts, model, n, cli.to_device(params, cli.device(args)), restored.step)
    return generate(fl.nn.inference(model), params, tok, sources, args, args.num_beams)


def averaged(ckpts: checkpoint.Checkpointer, model: Any, n: int, params: Any, step: int) -> Any:
    """The mean of ``params`` (those of the checkpoint at ``step``, already in hand: not read
    again) and of the ``n - 1`` checkpoints before it (fewer when fewer are kept), on the
    device of ``params``. Averaging the last few checkpoints of a run is a free ensemble that
    NMT toolkits apply by default (fairseq's ``average_checkpoints.py``, Marian's exponential
    smoothing)."""
    older = [s for s in ckpts.steps() if s < step][-(n - 1) :] if n > 1 else []
    if not older:
        return params
    where = fl.tree.leaves(params)[0].device
    trees = [cli.to_device(cli.trained_params(model, ckpts.load(step=s)), where) for s in older]
    return fl.tree.map(lambda *leaves: sum(leaves) / len(leaves), params, *trees)


def trained(restored: checkpoint.Restored, name: str) -> tuple[Any, Any, Any]:
    """``(model, params, tokenizer)`` of a translate or summarize checkpoint, as its metadata
    describes them (``name`` is what an error calls its tokenizer's owner)."""
    tok = data.tokenizer_from_json(restored.metadata["tokenizer"], f"{name}'s tokenizer")
    cfg = checkpoint.config_from_dict(fl.models.TransformerConfig, restored.metadata["config"])
    model = fl.models.Transformer(cfg)
    return model, cli.trained_params(model, restored.state), tok
