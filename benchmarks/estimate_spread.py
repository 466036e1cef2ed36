"""How noisy is nanoGPT's validation figure? The spread of the 20-batch estimate for one model.

Loads the newest checkpoint of a ``pretrain_gpt.py`` run, then evaluates nanoGPT's estimate
(the mean loss over ``--eval-iters`` random validation batches) under ``--draws`` different keys,
next to the exact loss over the whole validation split.

    python -m benchmarks.estimate_spread out/pretrain_gpt [--data FILE]   # default: the run's
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import functional_llm as fl
from experiments import pretrain_gpt
from functional_llm import checkpoint, data, losses, random, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--data", help="the text the run trained on (default: the run's --data)")
    p.add_argument("--draws", type=int, default=50)
    p.add_argument("--eval-iters", type=int, default=20)
    args = p.parse_args()
    exp = pretrain_gpt
    run = Path(args.run_dir)
    ckpts = checkpoint.Checkpointer(run / "checkpoints")
    meta = checkpoint.metadata(ckpts.path(ckpts.latest()))
    run_args = argparse.Namespace(**{**meta["args"], "eval_iters": args.eval_iters})
    run_args.data = args.data or run_args.data
    model = fl.models.GPT(checkpoint.config_from_dict(fl.models.GPTConfig, meta["config"]))
    params = ckpts.load()["state"][0]  # TrainState's first field, rebuilt without a template
    _, _, val = exp.corpus(run_args, data.load_tokenizer(run / "tokenizer.json"))
    eval_step = train.make_eval_step(losses.next_token(model))
    estimates = [
        exp.estimate(eval_step, params, val, run_args, random.fold_in(random.key(12345), d))
        for d in range(args.draws)
    ]
    windows = data.eval_windows(val, 64, model.config.max_seq_len)
    whole = train.evaluate(eval_step, params, windows)["loss"]
    mean, std = statistics.mean(estimates), statistics.stdev(estimates)
    print(f"{args.draws} estimates of {args.eval_iters} batches: mean {mean:.4f}, std {std:.4f}, "
          f"range {min(estimates):.4f}..{max(estimates):.4f}; whole split {whole:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
