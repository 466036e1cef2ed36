"""One AdamW update on a GPT-shaped pytree: functional_llm.optim against torch.optim.AdamW.

Both sides update the same parameters with the same gradient in the same process; rounds are
interleaved so machine noise hits every case alike. Cases:

* ``torch foreach``: ``torch.optim.AdamW(foreach=True)``, in place (the reference);
* ``torch fused``: ``torch.optim.AdamW(fused=True)``, in place, where the build supports it;
* ``ours eager``: ``adamw(...).update`` + ``apply_updates``, Optax's two calls (the chain's
  arithmetic; new tensors);
* ``ours compiled``: the same step under ``torch.compile``;
* ``ours pure step``: ``optim.update_and_apply(adamw(...), ...)``, pure, as ``make_step`` runs
  it: eagerly, AdamW's fused kernel on copies of params and state the step makes and owns;
* ``ours donated``: the same without the copies: the caller hands over params and state, and
  AdamW's ``update_in_place`` (the fused kernel) writes the new values into their buffers.

Peak memory: each case also runs alone in a child process, which reports its peak resident
set minus its resting one after the steps (params, grads and optimizer state): the transient
memory one update needs; and the peak itself. With ``--retain-freed-memory`` freed memory stays
resident, so the transient column reads near 0 and the peak is the figure to compare.

    python -m benchmarks.optim [--layers 4 --vocab 50257 --repeats 7] [--no-compile]
    python -m benchmarks.optim --retain-freed-memory      # fl.allocator.retain_freed_memory()

Allocator settings change every figure; both sides run under the same ones, and the script
prints the ``MALLOC_*`` variables in effect and whether ``--retain-freed-memory`` applied.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import functional_llm as fl
from functional_llm import optim

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.95), 1e-8, 0.1


def make_params(layers: int, vocab: int) -> dict:
    cfg = fl.models.GPTConfig.gpt2("small", n_layers=layers, vocab_size=vocab)
    model = fl.models.GPT(cfg)
    params = fl.tree.map(lambda x: torch.randn(x.shape) * 0.02, model.shapes())
    return params


def cases(
    params: dict, grads: dict, compile_too: bool
) -> dict[str, Callable[[], Callable[[], object]]]:
    """``{name: factory}``; a factory builds its case (copies, optimizer state) when called,
    so a child process measuring one case holds only that case's buffers."""
    leaves, g_leaves = fl.tree.leaves(params), fl.tree.leaves(grads)

    def torch_case(**kw: bool) -> Callable[[], object]:
        ps = [torch.nn.Parameter(x.clone()) for x in leaves]
        for p, g in zip(ps, g_leaves, strict=True):
            p.grad = g
        return torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kw).step

    def pure_case(compiled: bool) -> Callable[[], object]:
        opt = optim.adamw(LR, *BETAS, EPS, WD)

        def pure_step(p: dict, s: object) -> tuple:
            updates, s = opt.update(grads, s, p)
            return optim.apply_updates(p, updates), s

        step = torch.compile(pure_step) if compiled else pure_step
        holder = {"p": params, "s": opt.init(params)}

        def go() -> None:
            holder["p"], holder["s"] = step(holder["p"], holder["s"])

        return go

    def update_and_apply_case(donate: bool) -> Callable[[], object]:
        opt = optim.adamw(LR, *BETAS, EPS, WD)
        holder = {"p": fl.tree.map(torch.clone, params)}
        holder["s"] = opt.init(holder["p"])

        def go() -> None:
            holder["p"], holder["s"] = optim.update_and_apply(
                opt, holder["p"], grads, holder["s"], donate=donate
            )

        return go

    out = {
        "torch foreach": lambda: torch_case(foreach=True),
        "torch fused": lambda: torch_case(fused=True),
        "ours eager": lambda: pure_case(False),
        "ours pure step": lambda: update_and_apply_case(False),
        "ours donated": lambda: update_and_apply_case(True),
    }
    if compile_too:
        out["ours compiled"] = lambda: pure_case(True)
    return out


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _status_mb(field: str) -> float:
    """A memory line of /proc/self/status in MiB (VmHWM is the peak RSS of this process
    image: unlike ru_maxrss, it does not carry the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def child(args: argparse.Namespace) -> None:
    """Run one case alone: its peak resident set above the resting one (params, grads, state)."""
    params = make_params(args.layers, args.vocab)
    grads = fl.tree.map(lambda x: torch.randn_like(x) * 1e-3, params)
    fn = cases(params, grads, args.case == "ours compiled")[args.case]()
    for _ in range(4):
        fn()
    peak = _status_mb("VmHWM")
    print(json.dumps({"transient_mb": peak - _status_mb("VmRSS"), "peak_mb": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument(
        "--retain-freed-memory",
        action="store_true",
        help="keep freed memory in the heap (fl.allocator), for every case",
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    retained = args.retain_freed_memory and fl.allocator.retain_freed_memory()
    if args.case:
        return child(args)

    params = make_params(args.layers, args.vocab)
    grads = fl.tree.map(lambda x: torch.randn_like(x) * 1e-3, params)
    n = fl.tree.size(params)
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    shape = f"AdamW on {n / 1e6:.1f}M parameters in {len(fl.tree.leaves(params))} tensors"
    print(f"{shape}; {torch.get_num_threads()} threads; allocator settings: {malloc or 'default'}"
          f"; freed memory retained: {retained}")  # fmt: skip
    fns = {}
    for name, factory in cases(params, grads, not args.no_compile).items():
        try:
            fns[name] = factory()
            fns[name]()  # warm-up: compilation, lazy state
            fns[name]()
        except RuntimeError as err:  # e.g. a build without the CPU fused kernel
            print(f"({name} unavailable: {err})")
            fns.pop(name, None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.repeats):  # interleaved rounds
        for name, fn in fns.items():
            times[name].append(median_ms(fn, 1))
    ref = statistics.median(times["torch foreach"])
    print(f"{'case':<16} {'median ms':>10} {'vs foreach':>11} {'transient MB':>13} {'peak MB':>8}")
    for name in fns:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.optim",
            "--case",
            name,
            "--layers",
            str(args.layers),
            "--vocab",
            str(args.vocab),
            *(["--retain-freed-memory"] if args.retain_freed_memory else []),
        ]
        root = Path(__file__).resolve().parents[1]  # this checkout, installed or not
        result = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=root)
        memory = json.loads(result.stdout.strip().splitlines()[-1])
        med = statistics.median(times[name])
        print(f"{name:<16} {med:>10.1f} {med / ref:>11.2f} {memory['transient_mb']:>13.0f} "
              f"{memory['peak_mb']:>8.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
