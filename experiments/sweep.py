"""A learning-rate sweep as one run: N small GPTs, one per learning rate, trained together by
one vmapped step (``functional_llm.ensemble``) on the same batches.

    python -m experiments.sweep                                 # 8 rates from 1e-4 to 3e-2
    python -m experiments.sweep --members 4 --lr-min 3e-4 --lr-max 3e-3 --compile
    python -m experiments.sweep --resume                        # continue from the checkpoint

Each member is the run ``pretrain_gpt`` would make with its learning rate: its own params
(from ``fold_in(seed, i)``), its own AdamW state and dropout keys, the same warmup-then-cosine
shape scaled by its rate. The corpus is ``pretrain_gpt``'s (the standard library's source, or
``--data``), char-level, split 90/10. Evaluations score every member on the same held-out
batches.

Writes to ``--out-dir``: ``metrics.jsonl`` (per logged step, the members' losses as lists),
``loss.png`` (every member's training curve and validation points, one colour per rate),
``tokenizer.json`` and ``checkpoints/`` (the whole stacked state). Prints each rate's final
validation loss and the best member.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import functional_llm as fl
from experiments import cli, stdlib_text
from functional_llm import checkpoint, data, ensemble, losses, optim, random, runs, train

OUTPUTS = ("checkpoints", "metrics.jsonl", "tokenizer.json", "loss.png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    a, count = p.add_argument, cli.positive_int
    a("--data", help="a UTF-8 text file (default: the Python standard library's source)")
    a("--corpus-mb", type=cli.positive_float, default=1.0)
    a("--members", type=count, default=8, help="how many learning rates")
    a("--lr-min", type=cli.positive_float, default=1e-4)
    a("--lr-max", type=cli.positive_float, default=3e-2)
    a("--n-layer", type=count, default=2)
    a("--n-head", type=count, default=4)
    a("--n-embd", type=count, default=64)
    a("--block-size", type=count, default=64)
    a("--batch-size", type=count, default=12)
    a("--max-iters", type=count, default=1000)
    a("--warmup-iters", type=cli.nonnegative_int, default=50)
    a("--eval-interval", type=count, default=100)
    a("--eval-iters", type=count, default=5)
    a("--seed", type=cli.nonnegative_int, default=1337)
    a("--compile", action="store_true", help="compile the members' step (once)")
    a("--out-dir", default="out/sweep")
    a("--no-plot", action="store_true")
    cli.add_run_args(p)
    args = p.parse_args(argv)
    if args.lr_min > args.lr_max:
        p.error(f"--lr-min {args.lr_min} is above --lr-max {args.lr_max}")
    if args.warmup_iters >= args.max_iters:
        p.error(f"--warmup-iters {args.warmup_iters} must be below --max-iters {args.max_iters}")
    return args


def rates(args: argparse.Namespace) -> torch.Tensor:
    """The members' learning rates, evenly spaced in log scale."""
    if args.members == 1:
        return torch.tensor([args.lr_min])
    return torch.logspace(math.log10(args.lr_min), math.log10(args.lr_max), args.members)


def build(args: argparse.Namespace, vocab: int) -> tuple[Any, Any, train.TrainState]:
    """``(model, optimizer, stacked state)``: AdamW with an injected rate per member, times a
    shared warmup-cosine shape (peak 1, to a tenth)."""
    cfg = fl.models.GPTConfig(vocab_size=vocab, max_seq_len=args.block_size, d_model=args.n_embd,
                              n_layers=args.n_layer, n_heads=args.n_head, bias=False)  # fmt: skip
    model = fl.models.GPT(cfg)
    shape = optim.warmup_cosine(1.0, args.warmup_iters, args.max_iters, end_value=0.1,
                                init_value=1 / (args.warmup_iters + 1))  # fmt: skip
    decay = lambda p: fl.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731
    adamw = optim.inject_hyperparams(optim.adamw)(1.0, b2=0.99, weight_decay=0.1, mask=decay)
    opt = optim.chain(adamw, optim.scale_by_schedule(shape))
    keys = torch.stack([random.fold_in(random.key(args.seed), i) for i in range(args.members)])
    states = ensemble.init_states(model.init, opt, keys)
    return model, opt, ensemble.set_hyperparams(states, learning_rate=rates(args))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    out = runs.prepare(args.out_dir, resume=args.resume, overwrite=args.overwrite, outputs=OUTPUTS)
    text = data.read_text(args.data) if args.data else stdlib_text.stdlib_corpus(args.corpus_mb)
    ckpts = checkpoint.Checkpointer(out / "checkpoints", keep=1)
    restored, tok = None, None
    if args.resume:  # the state's template comes from the checkpoint's own tokenizer
        template = lambda t: {"state": build(args, t.vocab_size)[2]}  # noqa: E731
        restored, tok = cli.resume_with_tokenizer(ckpts, out / "tokenizer.json", template)
    tok = tok or data.CharTokenizer.train(text)
    ids = torch.from_numpy(tok.encode(text))
    split = int(0.9 * len(ids))
    if min(split, len(ids) - split) <= args.block_size:
        raise data.DataError(f"{args.data or 'the corpus'}: too short for --block-size")
    train_ids, val_ids = ids[:split], ids[split:]
    if restored is None:
        tok.save(out / "tokenizer.json")
    model, opt, states = build(args, tok.vocab_size)
    if restored is not None:
        states = restored.state["state"]
    loss_fn = losses.next_token(model)
    step = ensemble.make_step(train.make_step(loss_fn, opt, clip_norm=1.0, grad_method="func"))
    evaluate = torch.func.vmap(train.make_eval_step(loss_fn), in_dims=(0, None))
    if args.compile:
        step = train.compile(step)
    lrs = rates(args)
    print(f"{len(ids):,} tokens, vocab {tok.vocab_size}; {args.members} members of "
          f"{fl.tree.size(ensemble.index(states, 0).params):,} parameters; rates "
          f"{', '.join(f'{r:.1e}' for r in lrs.tolist())}")  # fmt: skip
    kept = restored.metadata.get("metrics_records") if restored else None
    log = runs.MetricsLog(out / "metrics.jsonl", keep=kept)
    k_data, k_eval = random.fold_in(random.key(args.seed), 10**6), random.key(args.seed + 1)
    val_batches = [
        data.sample_windows(val_ids, random.fold_in(k_eval, i), args.batch_size, args.block_size)
        for i in range(args.eval_iters)
    ]

    def validation() -> list[float]:
        scores = [evaluate(states.params, b)["loss"] for b in val_batches]
        return torch.stack(scores).mean(0).tolist()

    def save(at: int) -> Path:
        meta = {"args": vars(args), "tokenizer": tok.to_json(), "metrics_records": len(log.records)}
        return ckpts.save(at, {"state": states}, meta)

    start = int(states.step[0])
    with runs.interruptible() as stop:
        for it in tqdm(range(start, args.max_iters), initial=start, total=args.max_iters):
            if it % args.eval_interval == 0:
                log.record({"step": it, "val_loss": validation()})
            batch = data.sample_windows(train_ids, random.fold_in(k_data, it), args.batch_size,
                                        args.block_size)  # fmt: skip
            states, metrics = step(states, batch)
            log.record({"step": it + 1, "loss": metrics["loss"].tolist()})
            if stop and it + 1 < args.max_iters:
                cli.leave(stop, it + 1, save)
    final = validation()
    log.record({"step": args.max_iters, "val_loss": final})
    save(args.max_iters)
    log.close()
    if not args.no_plot:
        plot(log.records, lrs.tolist(), out / "loss.png")
    best = min(range(args.members), key=lambda i: final[i] if math.isfinite(final[i]) else math.inf)
    for i, (lr, v) in enumerate(zip(lrs.tolist(), final, strict=True)):
        print(f"lr {lr:.2e}: val loss {v:.4f}" + ("   <- best" if i == best else ""))
    total = time.perf_counter() - started
    print(f"wall time {total:.1f} s; outputs in {out}")
    return {"val_loss": final, "best_lr": lrs[best].item(), "best_val_loss": final[best],
            "wall_s": total}  # fmt: skip


def plot(records: list[dict], lrs: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.get_cmap("viridis")([i / max(1, len(lrs) - 1) for i in range(len(lrs))])
    for i, (lr, colour) in enumerate(zip(lrs, colours, strict=True)):
        ax.plot([r["step"] for r in steps], [r["loss"][i] for r in steps], lw=0.7, color=colour,
                label=f"lr {lr:.1e}")  # fmt: skip
        ax.plot([r["step"] for r in evals], [r["val_loss"][i] for r in evals], "o", ms=3,
                color=colour)  # fmt: skip
    ax.set(xlabel="step", ylabel="cross-entropy (nats/char)", title="learning-rate sweep: "
           "train (lines), validation (dots)")  # fmt: skip
    ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    cli.main_guard(main)
