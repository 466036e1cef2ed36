"""GPT forward, gradient and initialisation: pure functions against the same model as an nn.Module.

The reference is the conventional PyTorch idiom: ``nn.Embedding`` + ``nn.TransformerEncoder``
(pre-LN, GELU, causal) + a tied output layer, called as a module, differentiated with
``loss.backward()``, and initialised by module construction (global RNG). Both sides hold the
same weights (converted with ``interop.torch_nn``) and run in the same process on the same
batch; the script checks that their outputs agree before timing anything.

    python -m benchmarks.forward_vs_module [--layers 6 --d-model 384 --heads 6 --seq 256 --batch 8]
    python -m benchmarks.forward_vs_module --compile     # adds torch.compile of both sides

Prints the median of ``--repeats`` timings per case and the ratio ours / reference (< 1: ours
is faster). Absolute times on shared machines are noise; the ratio is the figure to keep.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import functional_llm as fl
from functional_llm.interop import torch_nn


class ModuleGPT(nn.Module):
    """The same architecture as ``fl.models.GPT`` (GPT-2 flavour) written as an nn.Module."""

    def __init__(self, cfg: fl.models.GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        layer = nn.TransformerEncoderLayer(
            cfg.d_model, cfg.n_heads, cfg.ffn_dim, dropout=0.0, activation="gelu", batch_first=True,
            norm_first=True, bias=cfg.bias,
        )  # fmt: skip
        self.blocks = nn.TransformerEncoder(
            layer, cfg.n_layers, norm=nn.LayerNorm(cfg.d_model, bias=cfg.bias),
            enable_nested_tensor=False,
        )  # fmt: skip

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
        h = self.blocks(h, mask=mask, is_causal=True)
        return h @ self.wte.weight.T


def load_into(module: ModuleGPT, model: fl.models.GPT, params: dict) -> None:
    with torch.no_grad():
        module.wte.weight.copy_(params["embed"]["table"])
        module.wpe.weight.copy_(params["pos"]["table"])
        for layer, p in zip(module.blocks.layers, params["blocks"], strict=True):
            layer.load_state_dict(torch_nn.to_encoder_layer(model.block, p).state_dict())
        module.blocks.norm.weight.copy_(params["norm"]["scale"])
        if module.blocks.norm.bias is not None:
            module.blocks.norm.bias.copy_(params["norm"]["bias"])


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=65)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    cfg = fl.models.GPTConfig(
        vocab_size=args.vocab,
        max_seq_len=args.seq,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
    )
    model = fl.models.GPT(cfg)
    params = model.init(fl.random.key(0))
    module = ModuleGPT(cfg).eval()
    load_into(module, model, params)
    x = fl.random.randint(fl.random.key(1), (args.batch, args.seq), 0, args.vocab)
    y = fl.random.randint(fl.random.key(2), (args.batch, args.seq), 0, args.vocab)
    with torch.no_grad():
        diff = (model.apply(params, x) - module(x)).abs().max().item()
    size = f"GPT {args.layers}x{args.d_model}, {fl.tree.size(params):,} params"
    print(f"{size}, batch {args.batch}x{args.seq}; max |ours - module| = {diff:.1e}")
    assert diff < 1e-4, "the two models disagree: the comparison would be meaningless"

    def our_loss(p: dict) -> torch.Tensor:
        return F.cross_entropy(model.apply(p, x).flatten(0, 1), y.flatten())

    def module_grad() -> None:
        module.zero_grad(set_to_none=True)
        F.cross_entropy(module(x).flatten(0, 1), y.flatten()).backward()

    our_forward = lambda: model.apply(params, x)  # noqa: E731
    our_grad = torch.func.grad(our_loss)
    cases = [
        ("forward (no grad)", lambda: our_forward(), lambda: module(x), True),
        ("loss + gradient", lambda: our_grad(params), module_grad, False),
        ("init", lambda: model.init(fl.random.key(3)), lambda: ModuleGPT(cfg), True),
    ]
    if args.compile:
        c_forward = torch.compile(model.apply)
        c_module = torch.compile(module)
        c_grad = torch.compile(our_grad)
        c_module_loss = torch.compile(lambda: F.cross_entropy(module(x).flatten(0, 1), y.flatten()))

        def c_module_grad() -> None:
            module.zero_grad(set_to_none=True)
            c_module_loss().backward()

        cases += [
            ("compiled forward", lambda: c_forward(params, x), lambda: c_module(x), True),
            ("compiled loss + gradient", lambda: c_grad(params), c_module_grad, False),
        ]

    print(f"{'case':<26} {'ours (ms)':>10} {'module (ms)':>12} {'ratio':>7}")
    for name, ours, theirs, no_grad in cases:
        with torch.set_grad_enabled(not no_grad):
            t_ours = median_time(ours, args.repeats)
            t_theirs = median_time(theirs, args.repeats)
        print(f"{name:<26} {t_ours * 1e3:>10.1f} {t_theirs * 1e3:>12.1f} {t_ours / t_theirs:>7.2f}")


if __name__ == "__main__":
    main()
