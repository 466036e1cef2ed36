"""A whole train step: ``fl.train.make_step`` against the conventional PyTorch loop.

The reference is the same GPT as an ``nn.Module`` (``forward_vs_module.ModuleGPT``: embeddings,
``nn.TransformerEncoder`` pre-LN, tied output), ``loss.backward()``, ``clip_grad_norm_`` and
``torch.optim.AdamW(foreach=True)``; its compiled form is ``torch.compile(module)`` with the
optimizer eager, as most scripts do. Ours is one pure step (value-and-grad on
``torch.autograd.grad``, clip, AdamW) eager and under ``fl.train.compile``, plus the donated
variant (``make_step(..., donate=True)``: AdamW's fused in-place kernel behind the pure API)
and remat. Same weights, batch and hyperparameters; the script checks that one step
of each lands on the same params before timing.

    python -m benchmarks.step_vs_module [--layers 6 --d-model 384 --heads 6 --seq 256 --batch 8]
    python -m benchmarks.step_vs_module --no-compile       # eager rows only

Each case is timed ``--repeats`` times, interleaved with the reference; the table shows the
median, the ratio to the reference of the same mode (< 1: ours is faster), the peak memory the
step adds above the live state (Linux ``VmHWM`` after resetting it, freed heap trimmed), and
MFU: ``(6 N + 12 L T d) B T`` FLOPs per step (nanoGPT's count) over the fp32 matmul rate
measured here, now.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import optree
import torch
import torch.nn.functional as F

import functional_llm as fl
from benchmarks.forward_vs_module import ModuleGPT, load_into
from functional_llm import losses, optim, random, train

_libc = ctypes.CDLL("libc.so.6")


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) * 1024


def peak_added(fn: Callable[[], object]) -> float:
    """MB that one call of ``fn`` adds to the resident set at its peak."""
    _libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    fn()
    return (_status("VmHWM") - before) / 2**20


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


class Reference:
    """The nn.Module loop; ``run(batch)`` is one optimizer step."""

    def __init__(self, model, params, args, compiled: bool) -> None:
        self.module = ModuleGPT(model.config)
        load_into(self.module, model, params)
        self.forward = torch.compile(self.module) if compiled else self.module
        self.opt = torch.optim.AdamW(
            self.module.parameters(), lr=args.lr, weight_decay=0.1, foreach=True
        )

    def run(self, batch: dict) -> None:
        logits = self.forward(batch["inputs"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class Ours:
    """``make_step``; ``run(batch)`` is one step, the state carried in ``self.state``."""

    def __init__(self, model, params, args, compiled=False, donate=False, remat=False) -> None:
        if remat:
            model = fl.models.GPT(dataclasses.replace(model.config, remat=True))
        opt = optim.adamw(args.lr, weight_decay=0.1)
        step = train.make_step(losses.next_token(model), opt, clip_norm=1.0, donate=donate)
        self.step = train.compile(step) if compiled else step
        self.state = train.init_state(optree.tree_map(torch.clone, params), opt, random.key(1))

    def run(self, batch: dict) -> None:
        self.state, _ = self.step(self.state, batch)


def check_same_step(model, params, args, batch) -> float:
    ref, ours = Reference(model, params, args, False), Ours(model, params, args)
    ref.run(batch)
    ours.run(batch)
    probe = Reference(model, ours.state.params, args, False).module
    diffs = [
        (a - b).abs().max().item()
        for a, b in zip(ref.module.parameters(), probe.parameters(), strict=True)
    ]
    return max(diffs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    cfg = fl.models.GPTConfig(
        vocab_size=args.vocab, max_seq_len=args.seq, d_model=args.d_model,
        n_layers=args.layers, n_heads=args.heads,
    )  # fmt: skip
    model = fl.models.GPT(cfg)
    params = model.init(random.key(0))
    tokens = random.randint(random.key(2), (args.batch, args.seq + 1), 0, args.vocab)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    threads = torch.get_num_threads()
    print(f"GPT {args.layers}x{args.d_model}, {fl.tree.size(params):,} params, batch "
          f"{args.batch}x{args.seq}, {threads} threads, torch {torch.__version__}")  # fmt: skip
    diff = check_same_step(model, params, args, batch)
    print(f"one step, ours vs reference: max |param diff| {diff:.2e}")

    n, tokens_per_step = fl.tree.size(params), args.batch * args.seq
    flops = (6 * n + 12 * args.layers * args.seq * args.d_model) * tokens_per_step
    peak = matmul_peak()
    print(
        f"fp32 matmul peak measured now: {peak / 1e9:.1f} GFLOP/s; {flops / 1e9:.1f} GFLOP per step"
    )

    modes = [False] if args.no_compile else [False, True]
    rows = []
    for compiled in modes:
        ref = Reference(model, params, args, compiled)
        cases = {
            "ours": Ours(model, params, args, compiled),
            "ours, remat": Ours(model, params, args, compiled, remat=True),
        }
        if not compiled:
            cases["ours, donated"] = Ours(model, params, args, donate=True)
        everyone = {"reference": ref, **cases}
        for case in everyone.values():  # warm up (and compile)
            for _ in range(2):
                case.run(batch)
        times = {name: [] for name in everyone}
        for _ in range(args.repeats):
            for name, case in everyone.items():
                start = time.perf_counter()
                case.run(batch)
                times[name].append(time.perf_counter() - start)
        mode = "compiled" if compiled else "eager"
        base = statistics.median(times["reference"])
        for name, case in everyone.items():
            t = statistics.median(times[name])
            mb = peak_added(lambda case=case: case.run(batch))
            rows.append((mode, name, t * 1e3, t / base, mb, flops / t / peak))
    print("\n| mode | case | median ms | ratio | peak +MB | MFU |\n|---|---|---|---|---|---|")
    for mode, name, ms, ratio, mb, mfu in rows:
        print(f"| {mode} | {name} | {ms:.0f} | {ratio:.2f} | {mb:.0f} | {mfu:.2f} |")


if __name__ == "__main__":
    main()
