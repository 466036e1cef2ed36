"""Per-step time and communication of a sharded train step against one process.

    python -m benchmarks.parallel_step                                     # 1 process
    torchrun --nproc-per-node 2 -m benchmarks.parallel_step --mesh dp=2
    torchrun --nproc-per-node 2 -m benchmarks.parallel_step --mesh tp=2
    torchrun --nproc-per-node 2 -m benchmarks.parallel_step --mesh dp=2 --fsdp

The model is nanoGPT's CPU config (4 layers, d 128, 4 heads, block 64, batch 12, vocab 65),
AdamW. It prints the median step time over ``--steps`` (after ``--warmup``) and, for one
more step, every collective DTensor issued with the bytes each rank sends into it (its
input's size, counted where DTensor calls the functional collectives). Each process runs
``--threads`` threads; on a 2-core machine compare 2 processes x 1 thread with 1 process at
1 and at 2 threads.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

import functional_llm as fl
from functional_llm import losses, models, optim, parallel, random, train

COLLECTIVES = ("all_reduce", "all_gather_single", "reduce_scatter_single", "all_to_all_single")


class CommCounter:
    """Counts the functional collectives DTensor calls on this rank (calls, input bytes) by
    wrapping ``torch.distributed._functional_collectives``' entry points while active."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()
        self.bytes: Counter = Counter()
        self._saved: dict = {}

    def __enter__(self) -> CommCounter:
        for name in COLLECTIVES:
            original = self._saved[name] = getattr(funcol, name)

            def counted(tensor, *args, _name=name, _fn=original, **kwargs):
                self.calls[_name] += 1
                self.bytes[_name] += tensor.numel() * tensor.element_size()
                return _fn(tensor, *args, **kwargs)

            setattr(funcol, name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._saved.items():
            setattr(funcol, name, fn)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mesh", default=None, help="e.g. dp=2 or tp=2 (under torchrun)")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = models.GPTConfig(vocab_size=64, max_seq_len=64, d_model=128, n_layers=4, n_heads=4)
    model, opt = models.GPT(cfg), optim.adamw(1e-3, weight_decay=0.1)
    step = train.make_step(losses.next_token(model), opt, clip_norm=1.0)
    state = train.init_state(model.init(random.key(0)), opt, random.key(1))
    batches = [{"tokens": random.randint(random.key(i), (12, 65), 0, 64)} for i in range(4)]
    label, rank = "1 process", 0
    if args.mesh:
        shape = {k: int(v) for k, v in (x.split("=") for x in args.mesh.split(","))}
        plan = parallel.Plan(
            parallel.make_mesh(shape),
            parallel.Rules.for_mesh(shape, fsdp=args.fsdp),
            model.axes(),
        )
        inner = plan.step(train.make_step(plan.loss(losses.next_token(model)), opt, clip_norm=1.0))
        step = lambda s, b: inner(s, plan.shard_batch(b))  # noqa: E731
        state = plan.shard(state)
        label, rank = f"mesh {shape}{' fsdp' if args.fsdp else ''}", dist.get_rank()
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, metrics = step(state, batches[i % len(batches)])
        float(metrics["loss"])
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    counter = CommCounter()
    with counter:
        step(state, batches[0])
    if rank == 0:
        print(
            f"{label}, {args.threads} thread(s)/process: "
            f"median step {statistics.median(times) * 1e3:.1f} ms "
            f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}); "
            f"params {fl.tree.size(state.params):,}"
        )
        total = sum(counter.bytes.values())
        for name in COLLECTIVES:
            if counter.calls[name]:
                print(
                    f"  {name}: {counter.calls[name]} calls, "
                    f"{counter.bytes[name] / 2**20:.3f} MiB in"
                )
        print(f"  total per step per rank: {total / 2**20:.3f} MiB into collectives")
    if args.mesh:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
