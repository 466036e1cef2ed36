"""nanoGPT's CPU table, side by side: the conventional loop against ``experiments/pretrain_gpt.py``.

nanoGPT's README trains ``shakespeare_char`` on CPU with 4 layers, 4 heads, d 128, block 64,
batch 12, 2000 iterations, AdamW lr 1e-3 -> 1e-4 (cosine, 100 warmup), beta2 0.99, weight
decay 0.1 on matrices, clip 1.0, dropout 0, no biases, and reports val loss 1.88 ("about 3
minutes"). The figures measured here are in the README.

This script runs that recipe twice in one process, on the same file, the same 90/10 split,
the same initial weights and the same batches:

* **reference**: the model as an ``nn.Module`` (``forward_vs_module.ModuleGPT``, pre-LN
  ``nn.TransformerEncoder``, tied output), ``loss.backward()``, ``clip_grad_norm_``,
  ``torch.optim.AdamW(foreach=True)`` with nanoGPT's two param groups and its lr formula;
* **ours**: ``experiments/pretrain_gpt.main`` with the same flags (``--flavour`` picks the
  architecture; ``gpt2`` is the same model as the reference).

It prints, for each, the validation loss (nanoGPT's 20-batch estimate and the exact loss over the
whole validation split) and the training-loop wall time, and the time ratio ours / reference.

    python -m benchmarks.nanogpt_cpu --data tinyshakespeare.txt [--flavour llama]
    # the file: karpathy/char-rnn data/tinyshakespeare/input.txt
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import functional_llm as fl
from benchmarks.forward_vs_module import ModuleGPT, load_into
from experiments import pretrain_gpt
from functional_llm import data, random, train

ROOT = Path(__file__).resolve().parents[1]


def nanogpt_lr(it: int, args) -> float:
    if it < args.warmup_iters:
        return args.lr * (it + 1) / (args.warmup_iters + 1)
    ratio = (it - args.warmup_iters) / (args.lr_decay_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * min(ratio, 1.0))) * (args.lr - args.min_lr)


def reference_run(exp, args) -> dict[str, float]:
    """The conventional loop, initialised and fed exactly as the experiment is."""
    tok, train_ids, val_ids = exp.corpus(args)
    cfg = exp.model_config(args, tok.vocab_size)
    k_init, _, k_data, k_eval, _ = random.split(random.key(args.seed), 5)
    module = ModuleGPT(cfg)
    load_into(module, fl.models.GPT(cfg), fl.models.GPT(cfg).init(k_init))
    decay = [p for p in module.parameters() if p.dim() >= 2]
    rest = [p for p in module.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": rest, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, args.beta2), foreach=True,
    )  # fmt: skip

    def loss_of(batch) -> torch.Tensor:
        logits = module(batch["inputs"])
        return F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())

    @torch.no_grad()
    def eval_step(_params, batch) -> dict[str, torch.Tensor]:  # the experiment's interface
        module.eval()
        loss = loss_of(batch)
        module.train()
        return {"loss": loss, "count": torch.tensor(batch["targets"].numel())}

    def estimate(tokens, key) -> float:
        return exp.estimate(eval_step, None, tokens, args, key)

    start = time.perf_counter()
    for it in range(args.max_iters):
        if it % args.eval_interval == 0:
            estimate(val_ids, random.fold_in(random.fold_in(k_eval, it), 1))
        for group in opt.param_groups:
            group["lr"] = nanogpt_lr(it, args)
        batch = data.sample_windows(
            train_ids, random.fold_in(k_data, it), args.batch_size, args.block_size
        )
        loss_of(batch).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    val = estimate(val_ids, random.fold_in(random.fold_in(k_eval, args.max_iters), 1))
    whole = train.evaluate(eval_step, None, data.eval_windows(val_ids, 64, args.block_size))
    return {"val_loss": val, "full_val_loss": whole["loss"], "train_s": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--flavour", choices=("gpt2", "llama"), default="gpt2")
    p.add_argument("--max-iters", type=int, default=2000)
    p.add_argument("--no-donate", action="store_true", help="ours with the pure (undonated) step")
    p.add_argument("--out-dir", default="out/nanogpt_cpu")
    cli = p.parse_args()
    exp = pretrain_gpt
    flags = ["--data", cli.data, "--max-iters", str(cli.max_iters), "--no-plot"]
    args = exp.parse_args([*flags, "--out-dir", cli.out_dir])
    reference = reference_run(exp, args)
    extra = ["--no-donate"] if cli.no_donate else []
    ours = exp.main(
        [*flags, "--out-dir", cli.out_dir, "--flavour", cli.flavour, "--overwrite", *extra]
    )  # this benchmark's folder, replaced on every run
    print("\n| run | val loss (20-batch estimate) | val loss (whole split) | training s |")
    print("|---|---|---|---|")
    print(f"| reference (nn.Module loop, gpt2) | {reference['val_loss']:.4f} | "
          f"{reference['full_val_loss']:.4f} | {reference['train_s']:.1f} |")  # fmt: skip
    name = f"ours ({cli.flavour}{', pure step' if cli.no_donate else ', donated'})"
    print(f"| {name} | {ours['val_loss']:.4f} | {ours['full_val_loss']:.4f} | "
          f"{ours['train_s']:.1f} |")  # fmt: skip
    print(f"time ratio ours / reference: {ours['train_s'] / reference['train_s']:.2f}")


if __name__ == "__main__":
    main()
