"""Compress a pretrained GPT every way the library can, and measure each variant.

    python -m experiments.pretrain_gpt               # first: the model to compress
    python -m experiments.compress out/pretrain_gpt  # then: one table

The model is a ``pretrain_gpt`` run (its newest intact checkpoint, config, tokenizer and the
arguments that say which corpus it read). Variants: fp32, bf16, int8 and int4 weight-only
quantisation (``compress.quantize``), 25 % and 50 % of the heads pruned (by magnitude) without
and with a short recovery fine-tune (``--recovery-steps``), a model of the pruned size trained
from scratch for as many steps (what the recovery is worth), and a student of half the depth
(initialised from every other teacher layer, as DistilBERT does) trained for
``--student-steps`` with and without distillation (``compress.distill``).

For each: parameter bytes, greedy decode tokens/s with the cache at batch 1 and 8 (median of
``--repeats``), and the loss on the run's held-out split (``--eval-batches`` windows of the
last tenth of the corpus). Writes ``compress.json`` and ``compress.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import functional_llm as fl
from experiments import cli, pretrain_gpt
from functional_llm import checkpoint, compress, data, losses, optim, random, train


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    a, count = p.add_argument, cli.positive_int
    a("run", help="a pretrain_gpt output folder")
    a("--out", default=None, help="where the table goes (default: the run folder)")
    a("--recovery-steps", type=count, default=200)
    a("--student-steps", type=count, default=300)
    a("--lr", type=cli.positive_float, default=1e-3)
    a("--temperature", type=cli.positive_float, default=2.0)
    a("--alpha", type=cli.rate, default=0.5)
    a("--eval-batches", type=count, default=30)
    a("--new-tokens", type=count, default=48)
    a("--repeats", type=count, default=3)
    a("--seed", type=cli.nonnegative_int, default=0)
    return p.parse_args(argv)


def _run(where: Path) -> tuple[Any, Any, Any, torch.Tensor, torch.Tensor, dict]:
    """The run's model, params, tokenizer, train and validation ids, and its arguments."""
    restored = cli.newest_checkpoint(where, "; run experiments.pretrain_gpt")
    meta = restored.metadata
    cfg = checkpoint.config_from_dict(fl.models.GPTConfig, meta["config"])
    model = fl.nn.inference(fl.models.GPT(cfg))
    params = cli.trained_params(model, restored.state)
    tok = data.tokenizer_from_json(meta["tokenizer"], f"{where}'s tokenizer")
    run_args = argparse.Namespace(**meta["args"])
    _, train_ids, val_ids = pretrain_gpt.corpus(run_args, tok)
    return model, params, tok, train_ids, val_ids, meta["args"]


def _val_loss(model: Any, params: Any, val_ids: torch.Tensor, args: argparse.Namespace) -> float:
    step = train.make_eval_step(losses.next_token(model))
    block = model.config.max_seq_len
    windows = data.eval_windows(val_ids, 16, block, max_batches=args.eval_batches)
    return train.evaluate(step, params, windows)["loss"]


def _tokens_per_s(
    model: Any, params: Any, prompts: torch.Tensor, args: argparse.Namespace
) -> float:
    decode = fl.generate.decoder(model, params)
    n = min(args.new_tokens, model.config.max_seq_len - prompts.shape[1])

    def once() -> None:
        fl.generate.generate(model, params, prompts, max_new_tokens=n, decode=decode)

    once()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return prompts.shape[0] * n / statistics.median(times)


def _train(model: Any, params: Any, loss_fn: Any, train_ids: torch.Tensor, steps: int,
           args: argparse.Namespace, seed: int) -> Any:  # fmt: skip
    """``steps`` of AdamW (warmup, cosine) on the run's training split; the params after."""
    schedule = optim.warmup_cosine(args.lr, min(20, steps - 1), steps, end_value=args.lr / 10)
    opt = optim.adamw(schedule, weight_decay=0.1)
    step = train.make_step(loss_fn, opt, clip_norm=1.0)
    state = train.init_state(params, opt, random.key(seed))
    k_data = random.key(seed + 1)
    for it in range(steps):
        batch = data.sample_windows(
            train_ids, random.fold_in(k_data, it), 12, model.config.max_seq_len
        )
        state, _ = step(state, batch)
    return state.params


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    where = Path(args.run)
    model, params, _, train_ids, val_ids, _ = _run(where)
    c = model.config
    if c.n_kv_heads not in (None, c.n_heads) or c.n_heads < 2 or c.n_layers < 2:
        raise data.DataError(f"{where}: compress needs multi-head attention, 2+ heads and layers")
    g = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, len(val_ids) - 8, (8,), generator=g).tolist()
    prompts = {b: torch.stack([val_ids[s : s + 8] for s in starts[:b]]) for b in (1, 8)}
    variants: dict[str, tuple[Any, Any]] = {"fp32": (model, params)}
    bf16 = fl.models.GPT(dataclasses.replace(c, dtype=torch.bfloat16))
    variants["bf16"] = (bf16, fl.tree.map(lambda x: x.to(torch.bfloat16), params))
    variants["int8 (weight-only)"] = (model, compress.quantize(params, model.axes(), bits=8))
    variants["int8, bf16 activations"] = (
        model, compress.quantize(params, model.axes(), bits=8, bf16_activations=True)
    )  # fmt: skip
    try:
        variants["int4 (weight-only, g32)"] = (
            model,
            compress.quantize(params, model.axes(), bits=4),
        )
    except ValueError as err:  # widths the int4 kernel's tiles do not fit
        print(f"int4 left out: {err}")
    for frac in (0.25, 0.5):
        keep = max(1, round(c.n_heads * (1 - frac)))
        small, pruned = compress.prune_heads(model, params, keep)
        label = f"heads pruned {int(frac * 100)} % ({keep}/{c.n_heads})"
        variants[label] = (small, pruned)
        loss = losses.next_token(small)
        recovered = _train(small, pruned, loss, train_ids, args.recovery_steps, args, args.seed)
        variants[f"{label} + {args.recovery_steps} recovery steps"] = (small, recovered)
        if frac == 0.25:
            fresh = small.init(random.key(args.seed + 7))
            scratch = _train(small, fresh, loss, train_ids, args.recovery_steps, args, args.seed)
            variants[f"{keep}-head model from scratch, {args.recovery_steps} steps"] = (
                small,
                scratch,
            )
    student = fl.nn.inference(fl.models.GPT(dataclasses.replace(c, n_layers=c.n_layers // 2)))
    init = {**params, "blocks": params["blocks"][::2][: c.n_layers // 2]}  # every other layer
    hard = losses.next_token(student)
    soft = compress.distill(
        lambda p, b, k: student.apply(p, b["inputs"], key=k),
        lambda p, b: model.apply(p, b["inputs"]), params,
        alpha=args.alpha, temperature=args.temperature,
    )  # fmt: skip
    half = f"student, {student.config.n_layers} of {c.n_layers} layers, {args.student_steps} steps"
    variants[half] = (student, _train(student, init, hard, train_ids, args.student_steps, args, 1))
    variants[f"{half}, distilled"] = (
        student, _train(student, init, soft, train_ids, args.student_steps, args, 1)
    )  # fmt: skip
    table = {}
    for name, (m, p) in variants.items():
        table[name] = {
            "param_bytes": fl.tree.nbytes(p),
            "tokens_per_s_b1": _tokens_per_s(m, p, prompts[1], args),
            "tokens_per_s_b8": _tokens_per_s(m, p, prompts[8], args),
            "val_loss": _val_loss(m, p, val_ids, args),
        }
    lines = ["| variant | param bytes | decode tok/s (b1) | decode tok/s (b8) | val loss |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, row in table.items():
        mib = row["param_bytes"] / 2**20
        lines.append(f"| {name} | {mib:.2f} MiB | {row['tokens_per_s_b1']:.0f} | "
                     f"{row['tokens_per_s_b8']:.0f} | {row['val_loss']:.4f} |")  # fmt: skip
    out = Path(args.out) if args.out else where
    out.mkdir(parents=True, exist_ok=True)
    (out / "compress.json").write_text(json.dumps(table, indent=2))
    (out / "compress.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return table


if __name__ == "__main__":
    cli.main_guard(main)
