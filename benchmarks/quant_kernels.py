"""Weight-only quantised matmuls against the float one they replace, at decode's batch of one:
``x (1, in) @ W`` in fp32 against ``Int8Weight.linear`` (float32 and bfloat16 activations) and
``Int4Weight.linear``, built by ``compress.quantize``. Medians of ``--repeats`` interleaved
rounds of ``--calls`` calls; the ratio is fp32 time / quantised time (> 1: quantised is faster).
Then whole greedy decoding with the cache at batch 1 (32 new tokens) of a GPT-2-width model (d
768, 6 layers, 12 heads, vocabulary 4096, 46M parameters, random init), fp32 against each
quantised form of its block weights.

    python -m benchmarks.quant_kernels [--repeats 7] [--calls 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import functional_llm as fl
from functional_llm import compress

SHAPES = ((128, 512), (768, 3072), (2048, 8192))


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| in x out | fp32 | int8 | int8, bf16 act. | int4 g32 |\n|---|---|---|---|---|")
    for k, n in SHAPES:
        w = torch.randn(k, n) / k**0.5
        params = {"blocks": [{"w": w}]}
        axes = {"blocks": [{"w": ("embed", "mlp")}]}
        x = torch.randn(1, k)
        cases = {
            "fp32": lambda w=w, x=x: x @ w,
            "int8": compress.quantize(params, axes)["blocks"][0]["w"],
            "int8 bf16": compress.quantize(params, axes, bf16_activations=True)["blocks"][0]["w"],
            "int4": compress.quantize(params, axes, bits=4)["blocks"][0]["w"],
        }
        runs = {
            name: (c if callable(c) else (lambda c=c, x=x: c.linear(x)))
            for name, c in cases.items()
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in runs.items():
                times[name].append(per_call_us(fn, args.calls))
        med = {name: statistics.median(t) for name, t in times.items()}
        cells = [
            f"{med[c]:.1f} µs ({med['fp32'] / med[c]:.2f}x)" for c in ("int8", "int8 bf16", "int4")
        ]
        print(f"| {k} x {n} | {med['fp32']:.1f} µs | " + " | ".join(cells) + " |")
    decode(args.repeats)


def decode(repeats: int) -> None:
    cfg = fl.models.GPTConfig(vocab_size=4096, max_seq_len=256, d_model=768, n_layers=6, n_heads=12)
    model = fl.models.GPT(cfg)
    params = model.init(fl.random.key(0))
    axes = model.axes()
    variants = {
        "fp32": params,
        "int8": compress.quantize(params, axes),
        "int8, bf16 activations": compress.quantize(params, axes, bf16_activations=True),
        "int4 g32": compress.quantize(params, axes, bits=4),
    }
    prompt = fl.random.randint(fl.random.key(1), (1, 8), 0, 4096)
    runs = {}
    for name, p in variants.items():
        step = fl.generate.decoder(model, p)
        runs[name] = lambda p=p, step=step: fl.generate.generate(
            model, p, prompt, max_new_tokens=32, decode=step
        )
        runs[name]()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(per_call_us(fn, 1) / 1e6)
    fp32 = 32 / statistics.median(times["fp32"])
    print(f"\ndecode, batch 1, {fl.tree.size(params) / 1e6:.0f}M params")
    print("| variant | tokens/s | vs fp32 |")
    print("|---|---|---|")
    for name, t in times.items():
        rate = 32 / statistics.median(t)
        print(f"| {name} | {rate:.1f} | {rate / fp32:.2f}x |")


if __name__ == "__main__":
    main()
