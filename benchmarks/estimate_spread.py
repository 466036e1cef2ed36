"""How noisy is nanoGPT's validation figure? The spread of the 20-batch estimate for one model.

Loads the newest checkpoint of a ``pretrain_gpt.py`` run, then evaluates nanoGPT's estimate
(the mean loss over ``--eval-iters`` random validation batches) under ``--draws`` different keys,
next to the exact loss over the whole validation split.

    python benchmarks/estimate_spread.py out/pretrain_gpt --data ../shared/data/tinyshakespeare.txt
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import functional_llm as fl
from functional_llm import checkpoint, data, losses, random, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--data", required=True, help="the text the run trained on")
    p.add_argument("--draws", type=int, default=50)
    p.add_argument("--eval-iters", type=int, default=20)
    args = p.parse_args()
    run = Path(args.run_dir)
    ckpts = checkpoint.Checkpointer(run / "checkpoints")
    meta = checkpoint.metadata(ckpts.path(ckpts.latest()))
    cfg = checkpoint.config_from_dict(fl.models.GPTConfig, meta["config"])
    model = fl.models.GPT(cfg)
    params = ckpts.load()["state"][0]  # TrainState's first field, rebuilt without a template
    tok = data.load_tokenizer(run / "tokenizer.json")
    ids = torch.from_numpy(tok.encode(Path(args.data).read_text(encoding="utf-8")))
    val = ids[int(0.9 * len(ids)) :]
    batch, block = meta["args"]["batch_size"], cfg.max_seq_len
    eval_step = train.make_eval_step(losses.next_token(model))
    estimates = []
    for d in range(args.draws):
        key = random.fold_in(random.key(12345), d)
        batches = [
            data.sample_windows(val, random.fold_in(key, i), batch, block)
            for i in range(args.eval_iters)
        ]
        estimates.append(train.evaluate(eval_step, params, batches)["loss"])
    whole = train.evaluate(eval_step, params, data.eval_windows(val, 64, block))["loss"]
    mean, std = statistics.mean(estimates), statistics.stdev(estimates)
    print(f"{args.draws} estimates of {args.eval_iters} batches: mean {mean:.4f}, std {std:.4f}, "
          f"range {min(estimates):.4f}..{max(estimates):.4f}; whole split {whole:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
