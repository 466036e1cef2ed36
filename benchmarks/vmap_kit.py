"""The research kit against the loops and libraries it replaces, in one process, same weights:

* per-example gradients of a 4-layer GPT at batch 32: ``privacy.per_example_grads`` (one vmap
  of grad) against the loop of single-example gradients (goal >= 10x), and against Opacus'
  ``GradSampleModule`` on the same model written as an ``nn.Module`` (goal >= 1x); the script
  first checks that all three give the same gradients;
* an ensemble of 8 members: one vmapped step on the stacked state (``ensemble.make_step``)
  against 8 sequential steps of the ordinary train step (goal >= 1.5x), on the model of the
  main job's CPU table (4 layers, d 128, 4 heads, block 64, batch 12, vocabulary 65) and on
  ``experiments/sweep.py``'s (2 layers, d 64).

Ratios are medians of ``--repeats`` interleaved rounds (> 1: ours is faster). ``--compile``
adds each of ours compiled (``train.compile``), against the ensemble's sequential steps compiled
too (about three minutes of compiling).

    python -m benchmarks.vmap_kit [--repeats 7] [--batch 32] [--members 8] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import functional_llm as fl
from functional_llm import ensemble, losses, optim, privacy, random, train

CFG = dict(vocab_size=65, max_seq_len=64, d_model=128, n_layers=4, n_heads=4)


class ModuleGPT(torch.nn.Module):
    """The same GPT as ``torch.nn`` layers (what Opacus hooks): untied, GELU, pre-LN."""

    def __init__(self, c: fl.models.GPTConfig) -> None:
        super().__init__()
        d, self.heads = c.d_model, c.n_heads
        self.embed = torch.nn.Embedding(c.vocab_size, d)
        self.pos = torch.nn.Embedding(c.max_seq_len, d)
        self.blocks = torch.nn.ModuleList()
        for _ in range(c.n_layers):
            block = torch.nn.ModuleDict({
                "attn_norm": torch.nn.LayerNorm(d), "q": torch.nn.Linear(d, d),
                "k": torch.nn.Linear(d, d), "v": torch.nn.Linear(d, d), "o": torch.nn.Linear(d, d),
                "mlp_norm": torch.nn.LayerNorm(d), "up": torch.nn.Linear(d, 4 * d),
                "down": torch.nn.Linear(4 * d, d),
            })  # fmt: skip
            self.blocks.append(block)
        self.norm = torch.nn.LayerNorm(d)
        self.unembed = torch.nn.Linear(d, c.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        h = self.embed(tokens) + self.pos(torch.arange(t).expand(b, t))
        for blk in self.blocks:
            x = blk["attn_norm"](h)
            q, k, v = (blk[n](x).view(b, t, self.heads, -1).transpose(1, 2) for n in "qkv")
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + blk["o"](a.transpose(1, 2).reshape(b, t, -1))
            h = h + blk["down"](F.gelu(blk["up"](blk["mlp_norm"](h))))
        return self.unembed(self.norm(h))

    def load(self, params: Any) -> ModuleGPT:
        """Our params into the modules (Linear weights are ``(out, in)``)."""
        sd = {"embed.weight": params["embed"]["table"], "pos.weight": params["pos"]["table"],
              "norm.weight": params["norm"]["scale"], "norm.bias": params["norm"]["bias"],
              "unembed.weight": params["unembed"]["w"].T}  # fmt: skip
        for i, p in enumerate(params["blocks"]):
            for n in "qkvo":
                w = p["attn"][n]["w"]
                sd[f"blocks.{i}.{n}.weight"] = (
                    w.reshape(-1, w.shape[-1]) if n == "o" else w.reshape(w.shape[0], -1)
                ).T
                sd[f"blocks.{i}.{n}.bias"] = p["attn"][n]["b"].reshape(-1)
            for ours, theirs in (("up", "up"), ("down", "down")):
                sd[f"blocks.{i}.{theirs}.weight"] = p["mlp"][ours]["w"].T
                sd[f"blocks.{i}.{theirs}.bias"] = p["mlp"][ours]["b"]
            for n in ("attn_norm", "mlp_norm"):
                sd[f"blocks.{i}.{n}.weight"] = p[n]["scale"]
                sd[f"blocks.{i}.{n}.bias"] = p[n]["bias"]
        self.load_state_dict({k: v.detach().clone().contiguous() for k, v in sd.items()})
        return self


def median_ratio(ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int) -> tuple:
    ours(), theirs()  # warm-up
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        for fn, out in ((ours, t_ours), (theirs, t_theirs)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    a, b = statistics.median(t_ours), statistics.median(t_theirs)
    return a, b, b / a


def per_example(args: argparse.Namespace) -> None:
    from opacus import GradSampleModule

    cfg = fl.models.GPTConfig(**CFG, tie_embeddings=False, activation="gelu")
    model = fl.models.GPT(cfg)
    params = model.init(random.key(0))
    loss_fn = losses.next_token(model)
    tokens = random.randint(random.key(1), (args.batch, 65), 0, 65)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    grad = train.value_and_grad(loss_fn)

    def vmapped() -> Any:
        return privacy.per_example_grads(loss_fn, params, batch)[1]

    def loop() -> Any:
        one = [grad(params, {k: v[i : i + 1] for k, v in batch.items()}, None)[1]
               for i in range(args.batch)]  # fmt: skip
        return fl.tree.map(lambda *g: torch.stack(g), *one)

    module = GradSampleModule(ModuleGPT(cfg).load(params), loss_reduction="mean")

    def opacus() -> Any:
        module.zero_grad(set_to_none=True)
        logits = module(batch["inputs"])
        F.cross_entropy(logits.reshape(-1, 65), batch["targets"].reshape(-1)).backward()
        return {n: p.grad_sample for n, p in module.named_parameters()}

    ours, looped, theirs = vmapped(), loop(), opacus()
    q_ours = ours["blocks"][1]["attn"]["q"]["w"].reshape(args.batch, 128, 128)
    q_theirs = theirs["_module.blocks.1.q.weight"].transpose(1, 2)
    print(f"per-example grads agree: vmap vs loop {max_diff(ours, looped):.1e}, "
          f"vmap vs Opacus (blocks.1.q.w) {(q_ours - q_theirs).abs().max():.1e}")  # fmt: skip
    ours_cases = {"vmap": vmapped}
    if args.compile:
        compiled = train.compile(lambda p, b: privacy.per_example_grads(loss_fn, p, b))
        ours_cases["vmap, compiled"] = lambda: compiled(params, batch)
    for name, fn in ours_cases.items():
        for label, reference in (("loop", loop), ("Opacus", opacus)):
            a, b, r = median_ratio(fn, reference, args.repeats)
            print(f"| per-example grads, batch {args.batch}: {name} vs {label} | {a * 1e3:.0f} ms"
                  f" | {b * 1e3:.0f} ms | {r:.2f}x |")  # fmt: skip


def max_diff(a: Any, b: Any) -> float:
    return max(
        float((x - y).abs().max())
        for x, y in zip(fl.tree.leaves(a), fl.tree.leaves(b), strict=True)
    )


SWEEP = dict(vocab_size=65, max_seq_len=64, d_model=64, n_layers=2, n_heads=4)


def ensemble_step(args: argparse.Namespace, shape: dict, name: str) -> None:
    model = fl.models.GPT(fl.models.GPTConfig(**shape, bias=False))
    opt = optim.inject_hyperparams(optim.adamw)(learning_rate=1e-3, weight_decay=0.1)
    loss_fn = losses.next_token(model)
    keys = random.split(random.key(0), args.members)
    stacked = ensemble.init_states(model.init, opt, keys)
    lrs = torch.logspace(-4, -2, args.members)
    stacked = ensemble.set_hyperparams(stacked, learning_rate=lrs)
    singles = ensemble.unstack(stacked)
    tokens = random.randint(random.key(2), (12, 65), 0, 65)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    vmapped = ensemble.make_step(train.make_step(loss_fn, opt, grad_method="func"))
    plain = train.make_step(loss_fn, opt)

    def together() -> Any:
        return vmapped(stacked, batch)

    def one_by_one() -> Any:
        return [plain(s, batch) for s in singles]

    got, want = together()[1]["loss"], torch.stack([m["loss"] for _, m in one_by_one()])
    print(f"ensemble losses agree ({name}): {(got - want).abs().max():.1e}")
    pairs = {"eager": (together, one_by_one)}
    if args.compile:
        vmapped_c, plain_c = train.compile(vmapped), train.compile(plain)
        pairs["compiled"] = (lambda: vmapped_c(stacked, batch),
                             lambda: [plain_c(s, batch) for s in singles])  # fmt: skip
    for how, (ours, theirs) in pairs.items():
        a, b, r = median_ratio(ours, theirs, args.repeats)
        print(f"| {args.members}-member ensemble step vs {args.members} sequential steps, {name}, "
              f"{how} | {a * 1e3:.0f} ms | {b * 1e3:.0f} ms | {r:.2f}x |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--compile", action="store_true", help="also time ours compiled")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| case | ours | theirs | theirs / ours |\n|---|---|---|---|")
    per_example(args)
    ensemble_step(args, CFG, "CPU-table model")
    ensemble_step(args, SWEEP, "the sweep's model (2 layers, d 64)")


if __name__ == "__main__":
    main()
