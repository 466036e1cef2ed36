"""What the fine-tuning experiments share: flags, the backbone (pretrained or fresh), the
optimizer (freezing, layer-wise decay, LoRA), the resumable training loop and batched
prediction.

A pretrained backbone is a directory written by ``pretrain_bert.py``: ``tokenizer.json`` and
``bert.safetensors`` (params, with the config in the checkpoint's metadata).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import functional_llm as fl
from experiments import cli
from functional_llm import checkpoint, data, finetune, optim, random, runs, train
from functional_llm.lora import LoRA


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The shape of a fresh backbone (the same defaults in every script)."""
    a, count = p.add_argument, cli.positive_int
    a("--max-length", type=count, default=128)
    a("--d-model", type=count, default=128)
    a("--n-layers", type=count, default=4)
    a("--n-heads", type=count, default=4)
    a("--d-ff", type=count, default=512)
    a("--dropout", type=cli.rate, default=0.1)
    cli.add_device_args(p)


def check_model_args(p: argparse.ArgumentParser, args: argparse.Namespace, family: str) -> None:
    """The model flags must make a valid config (``family``: bert or gpt); checked when the
    flags are parsed, before any data is read."""
    config = fl.models.GPTConfig if family == "gpt" else fl.models.BERTConfig
    try:
        config(**model_fields(args, vocab_size=8))
    except ValueError as err:
        p.error(f"the model flags do not make a valid model: {err}")


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """A fine-tuning script's flags, with the fresh backbone's shape checked."""
    args = p.parse_args(argv)
    if args.reinit and not args.pretrained:
        p.error("--reinit needs --pretrained (whose tokenizer and shape it keeps)")
    if not args.pretrained:
        check_model_args(p, args, args.backbone)
    return args


def model_fields(args: argparse.Namespace, vocab_size: int) -> dict[str, Any]:
    """Config fields shared by ``BERTConfig`` and ``GPTConfig`` from :func:`add_model_args`."""
    return dict(
        vocab_size=vocab_size, max_seq_len=args.max_length, d_model=args.d_model,
        n_layers=args.n_layers, n_heads=args.n_heads, d_ff=args.d_ff, dropout=args.dropout,
        dtype=cli.dtype(args),
    )  # fmt: skip


def add_args(p: argparse.ArgumentParser, out_dir: str, epochs: int = 3) -> None:
    a, count = p.add_argument, cli.positive_int
    a("--pretrained", help="a pretrain_bert.py output directory (default: a fresh backbone)")
    a("--backbone", choices=("bert", "gpt"), default="bert", help="fresh backbone's family")
    a("--vocab-size", type=count, default=4000, help="fresh tokenizer's vocabulary")
    add_model_args(p)
    a("--epochs", type=count, default=epochs)
    a("--eval-every", type=count, default=1, help="score the dev split every N epochs and last")
    a("--batch-size", type=count, default=32)
    a("--lr", type=cli.positive_float, default=3e-4)
    a("--warmup", type=cli.rate, default=0.1, help="fraction of the steps spent warming up")
    a("--weight-decay", type=cli.nonnegative_float, default=0.01)
    a("--freeze", action="append", default=[], help="glob of params to freeze (repeatable)")
    a("--layer-decay", type=cli.positive_float, default=1.0, help="layer-wise lr decay (1: off)")
    a("--lora-rank", type=cli.nonnegative_int, default=0, help="LoRA adapters' rank (0: off)")
    a("--lora-alpha", type=cli.positive_float, default=16.0)
    a("--max-train", type=count, default=None, help="use only the first N training examples")
    a(
        "--train-sample",
        type=count,
        default=None,
        help="use a random sample of N training examples, drawn with --seed (label budgets)",
    )
    a(
        "--reinit",
        action="store_true",
        help="with --pretrained: its tokenizer and shape, fresh weights (what pretraining adds)",
    )
    a("--seed", type=cli.nonnegative_int, default=0)
    a("--threads", type=count, default=None)
    a("--out-dir", default=out_dir)
    cli.add_run_args(p)
    a("--no-plot", action="store_true")


OUTPUTS = ("metrics.jsonl", "curves.png", "model.safetensors", "checkpoints", "tokenizer.json")


def open_run(args: argparse.Namespace) -> Run:
    """The run's folder, guarded (:func:`functional_llm.runs.prepare`), and its metrics log
    (with ``--resume`` kept whole until :func:`fit` rewinds it to its checkpoint)."""
    out = runs.prepare(args.out_dir, resume=args.resume, overwrite=args.overwrite,
                       outputs=OUTPUTS)  # fmt: skip
    return Run(out, keep=sys.maxsize if args.resume else None)


def train_dev(
    p: argparse.ArgumentParser,
    args: argparse.Namespace,
    read: Callable[[str], list],
    default: Callable[[], tuple[list, list]],
) -> tuple[list, list]:
    """``(train, dev)`` from ``--train``/``--dev`` (read with ``read``) or the ``default`` task,
    whole: a script takes its label set from the whole training split, then cuts that split to
    the label budget (:func:`budget`)."""
    if bool(args.train) != bool(args.dev):
        p.error("--train and --dev go together")
    train_part, dev_part = (read(args.train), read(args.dev)) if args.train else default()
    for name, part in (("training", train_part), ("dev", dev_part)):
        if not part:
            raise data.DataError(
                f"{getattr(args, name[:5]) or 'the default task'}: no {name} examples"
            )
    return train_part, dev_part


def budget(p: argparse.ArgumentParser, args: argparse.Namespace, examples: list) -> list:
    """The training examples cut to ``--train-sample`` drawn with ``--seed`` (:func:`draw`),
    then to the first ``--max-train``."""
    if args.train_sample:
        if args.train_sample > len(examples):
            p.error(f"--train-sample {args.train_sample}: the training split has only "
                    f"{len(examples):,} examples")  # fmt: skip
        examples = draw(examples, args.train_sample, args.seed)
    return examples[: args.max_train]


def draw(examples: list, n: int, seed: int) -> list:
    """``n`` of ``examples`` without repeats, in the order of a permutation drawn with
    ``fold_in(key(seed), 5)`` (so a seed's smaller draws are prefixes of its larger ones)."""
    order = random.permutation(random.fold_in(random.key(seed), 5), len(examples))
    return [examples[i] for i in order[:n].tolist()]


def backbone(args: argparse.Namespace, texts: Callable[[], Sequence[str]]) -> tuple[Any, Any, Any]:
    """``(tokenizer, backbone model, pretrained params or None)``; a fresh backbone gets a
    tokenizer trained on ``texts()`` (saved in the run's folder, and read back by ``--resume``),
    or with ``--reinit`` the pretrained run's tokenizer and config (and no params)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pretrained:
        where = Path(args.pretrained)
        tok = data.load_tokenizer(where / "tokenizer.json")
        meta = checkpoint.metadata(where / "bert.safetensors")
        cfg = checkpoint.config_from_dict(fl.models.BERTConfig, meta["config"])
        saved = fl.models.BERT(cfg)
        model = fl.models.BERT(
            dataclasses.replace(cfg, dropout=args.dropout, dtype=cli.dtype(args))
        )
        if args.max_length > cfg.max_seq_len:
            print(f"--max-length {args.max_length} cut to the backbone's {cfg.max_seq_len}")
            args.max_length = cfg.max_seq_len
        if args.reinit:
            return tok, model, None
        params = checkpoint.load(where / "bert.safetensors", like=saved.shapes())
        return tok, model, cli.to_device(params, torch.device("cpu"), cli.dtype(args))
    saved = Path(args.out_dir) / "tokenizer.json"
    if args.resume and saved.exists():  # training one again may split words differently
        tok = data.load_tokenizer(saved)
    else:
        tok = data.SubwordTokenizer.train(texts(), args.vocab_size)
        tok.save(saved)
    if args.backbone == "gpt":
        return tok, fl.models.GPT(fl.models.GPTConfig(**model_fields(args, tok.vocab_size))), None
    return tok, fl.models.BERT(fl.models.BERTConfig(**model_fields(args, tok.vocab_size))), None


def model_meta(tok: Any, backbone: Any, **extra: Any) -> dict[str, Any]:
    """What :mod:`experiments.inspect` needs to rebuild a fine-tuned model: the tokenizer, the
    backbone's family and config, and the task's own fields (labels)."""
    family = "gpt" if isinstance(backbone, fl.models.GPT) else "bert"
    return {"tokenizer": tok.to_json(), "backbone": family,
            "config": checkpoint.config_to_dict(backbone.config), **extra}  # fmt: skip


def init_params(head_model: Any, pretrained: Any, key: torch.Tensor) -> Any:
    params = head_model.init(key)
    return params if pretrained is None else finetune.with_backbone(params, pretrained)


def collate(pad_id: int, fields: Sequence[str]) -> Callable[[list[dict]], dict]:
    def pad(examples: list[dict]) -> dict:
        return data.pad_batch([{f: e[f] for f in fields} for e in examples], {"tokens": pad_id})

    return pad


class Run:
    """Metrics as strict JSON Lines (:class:`functional_llm.runs.MetricsLog`; ``keep``: the
    records a resumed run keeps) and a plot of the learning curves."""

    def __init__(self, out: Path, keep: int | None = None) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out, self._log = out, runs.MetricsLog(out / "metrics.jsonl", keep=keep)

    @property
    def records(self) -> list[dict]:
        return self._log.records

    def record(self, entry: dict) -> None:
        self._log.record(entry)

    def rewind(self, keep: int) -> None:
        """Continue from a checkpoint: the log's first ``keep`` records stay, later ones go."""
        self._log.close()
        self._log = runs.MetricsLog(self.out / "metrics.jsonl", keep=keep)

    def close(self, plot: bool, metric: str) -> None:
        self._log.close()
        if not plot:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r for r in self.records if "loss" in r]
        evals = [r for r in self.records if metric in r and "step" in r]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        left.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8)
        left.set(xlabel="step", ylabel="training loss (batch)", title=self.out.name)
        right.plot([r["step"] for r in evals], [r[metric] for r in evals], "o-")
        right.set(xlabel="step", ylabel=f"dev {metric}")
        fig.tight_layout()
        fig.savefig(self.out / "curves.png", dpi=120)
        plt.close(fig)


def fit(
    args: argparse.Namespace,
    loss_fn: Any,
    params: Any,
    head_model: Any,
    examples: Sequence[dict],
    pad: Callable[[list[dict]], dict],
    evaluate: Callable[[Any], dict[str, float]],
    run: Run,
    meta: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, float]]:
    """Train for ``args.epochs`` and evaluate after each; returns the final params and metrics.
    With ``--lora-rank`` only adapters and the head train; the backbone stays as loaded.
    ``meta`` goes into the saved model's metadata (what a reader needs to rebuild it).

    The train state is checkpointed after each epoch and when a signal stops the run;
    ``--resume`` restores the newest intact checkpoint and goes on from its step: the batch
    order of an epoch is a function of ``(seed, epoch)`` and a step's keys of the step, so the
    resumed run ends where the uninterrupted one would."""
    where = cli.device(args)
    params = cli.to_device(params, where)
    k_lora, k_train, k_data = random.split(random.key(args.seed + 1), 3)
    if args.lora_rank:
        lora = LoRA(rank=args.lora_rank, alpha=args.lora_alpha, targets=("backbone.*attn.[qkvo].w",
                                                               "backbone.*mlp.*.w"))  # fmt: skip
        base = params
        trainable = {"adapters": lora.init(k_lora, base, head_model.axes()), "head": base["head"]}
        effective = lambda t: lora.merge({**base, "head": t["head"]}, t["adapters"])  # noqa: E731
    else:
        trainable, effective = params, lambda t: t
    lengths = [len(e["tokens"]) for e in examples]
    per_epoch = -(-len(examples) // args.batch_size)
    total = per_epoch * args.epochs
    schedule = optim.warmup_cosine(args.lr, int(args.warmup * total), total)
    decay = lambda p: fl.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731
    opt = optim.adamw(schedule, weight_decay=args.weight_decay, mask=decay)
    if args.freeze:
        opt = finetune.freeze(opt, *args.freeze)
    if args.layer_decay < 1.0:
        depth = head_model.backbone.config.n_layers
        opt = optim.chain(opt, finetune.layerwise_decay(args.layer_decay, depth))
    # donated: neither the loop nor fit's callers read an old state or the params passed in
    step = cli.loop_step(lambda t, b, k: loss_fn(effective(t), b, k), opt, args, where)
    state = cli.to_device(train.init_state(trainable, opt, k_train), where)
    ckpts = checkpoint.Checkpointer(Path(args.out_dir) / "checkpoints", keep=1)
    if args.resume:
        restored = cli.resume(ckpts, {"state": state})
        if restored is not None:
            state = cli.to_device(restored.state["state"], where)
        run.rewind(restored.metadata["metrics_records"] if restored else 0)
    n_trained, _ = finetune.count_trainable(trainable, tuple(args.freeze))
    print(f"{len(examples):,} training examples, {total} steps; {n_trained:,} of "
          f"{fl.tree.size(effective(trainable)):,} parameters trained")  # fmt: skip
    started = time.perf_counter()
    bar = tqdm(total=total, initial=int(state.step), mininterval=1)
    final: dict[str, float] = {}
    guard = cli.Guard(args.skip_nonfinite)
    path = Path(args.out_dir) / "model.safetensors"
    about = {"args": vars(args), **(meta or {})}  # in the model's and each checkpoint's metadata

    def save(**extra: Any) -> None:
        guard.check()  # a diverged model is never written
        saved = state.params if args.lora_rank else effective(state.params)
        checkpoint.save(path, saved, {**about, "step": int(state.step), **extra})

    def save_state(done: int) -> Path:
        """What ``--resume`` continues from: the train state after step ``done``."""
        guard.check()
        return ckpts.save(done, {"state": state}, {**about, "metrics_records": len(run.records)})

    with runs.interruptible() as stop:
        for epoch in range(int(state.step) // per_epoch, args.epochs):
            order = data.BatchOrder(len(examples), args.batch_size, k_data, epoch=epoch,
                                    start=int(state.step) - epoch * per_epoch, lengths=lengths,
                                    bucket=50)  # fmt: skip
            loader = torch.utils.data.DataLoader(examples, batch_sampler=order, collate_fn=pad)
            for batch in loader:
                state, metrics = step(state, batch)
                guard.watch(int(state.step), metrics)
                bar.update()
                if int(state.step) % 10 == 0:
                    guard.check()
                    run.record(
                        {"step": int(state.step), **{k: float(v) for k, v in metrics.items()}}
                    )
                    bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
                if stop and int(state.step) < total:
                    save(interrupted=True)  # the model so far, usable as it is
                    cli.leave(stop, int(state.step), save_state, bar)
            guard.check()
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                final = evaluate(effective(state.params))
                run.record({"step": int(state.step), "epoch": epoch + 1, **final})
                bar.write(
                    f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items())
                )
            save_state(int(state.step))
    bar.close()
    if not final:  # resumed after the last epoch: score the model again, record nothing
        final = evaluate(effective(state.params))
    final["train_s"] = time.perf_counter() - started
    save()
    return effective(state.params), final


@torch.no_grad()
def predict(
    model: Any,
    params: Any,
    examples: Sequence[dict],
    pad: Callable,
    per_token: bool,
    batch_size: int = 128,
) -> list[Any]:
    """The model's outputs (eval mode: no dropout) per example as numpy; ``per_token`` outputs
    lose their padding. A tuple output (QA's start and end scores) gives a tuple per example."""
    outputs, evaluated = [], fl.nn.inference(model)
    where = fl.tree.leaves(params)[0].device
    for at in range(0, len(examples), batch_size):
        batch = cli.to_device(pad(list(examples[at : at + batch_size])), where)
        extra = {"token_types": batch["token_types"]} if "token_types" in batch else {}
        out = evaluated.apply(params, batch["tokens"], valid=batch["valid"], **extra)
        parts = tuple(p.float().cpu() for p in (out if isinstance(out, tuple) else (out,)))
        for row, n in enumerate(batch["valid"].sum(-1).tolist()):
            per = tuple(np.asarray(p[row, :n] if per_token else p[row]) for p in parts)
            outputs.append(per if isinstance(out, tuple) else per[0])
    return outputs
