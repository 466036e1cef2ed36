"""The gradient path, measured: ``torch.func.grad_and_value`` against ``torch.autograd.grad``
(the library's ``fl.train.value_and_grad``), with and without remat, eager and compiled.

This is the evidence behind ``functional_llm.train``'s choice. One loss + gradient of a GPT
(6 layers, d=384, batch 8x256). Times: all cases in this process, in interleaved rounds, the
median per case. Peak memory: each case alone in a subprocess, so that the resident memory it
adds at its peak (Linux ``VmHWM``, reset before the call) is its own.

    python -m benchmarks.gradient_path [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

# (gradient path, compiled, remat); torch.func.grad refuses remat, so it has no remat rows.
CASES = [
    ("func", False, False), ("func", True, False), ("autograd", False, False),
    ("autograd", True, False), ("autograd", False, True), ("autograd", True, True),
]  # fmt: skip


def build(method: str, compiled: bool, remat: bool):
    """The case's gradient function and its arguments."""
    import torch.nn.functional as F

    import functional_llm as fl

    cfg = fl.models.GPTConfig(
        vocab_size=65, max_seq_len=256, d_model=384, n_layers=6, n_heads=6, remat=remat
    )
    model = fl.models.GPT(cfg)
    params = model.init(fl.random.key(0))
    tokens = fl.random.randint(fl.random.key(1), (8, 257), 0, 65)

    def loss(p, t):
        logits = model.apply(p, t[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), t[:, 1:].flatten()), {}

    grad = fl.train.value_and_grad(loss, method)
    if compiled:
        grad = fl.train.compile(grad)
    for _ in range(2):  # warm up (and compile)
        grad(params, tokens)
    return lambda: grad(params, tokens)


def peak_of(case: tuple) -> float:
    from benchmarks.step_vs_module import peak_added

    return peak_added(build(*case))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(peak_of(tuple(json.loads(args.case)))))
        return
    peaks = []
    for case in CASES:
        out = subprocess.run(
            [sys.executable, __file__, "--case", json.dumps(case)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        peaks.append(json.loads(out.stdout.strip().splitlines()[-1]))
    calls = [build(*case) for case in CASES]
    times: list[list[float]] = [[] for _ in CASES]
    for _ in range(args.repeats):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call()
            times[i].append(time.perf_counter() - start)
    print("| path | mode | remat | median ms | peak +MB |\n|---|---|---|---|---|")
    for (method, compiled, remat), t, peak in zip(CASES, times, peaks, strict=True):
        mode = "compiled" if compiled else "eager"
        ms = statistics.median(t) * 1e3
        print(f"| {method} | {mode} | {'yes' if remat else 'no'} | {ms:.0f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
