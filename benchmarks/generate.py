"""Greedy decoding with the key/value cache against Hugging Face ``transformers``' ``generate``.

Both sides run a 6-layer d=384 GPT-2 (6 heads, GPT-2's vocabulary, exact GELU) with the same
random weights: the ``GPT2LMHeadModel`` is built from a config (no download) and its weights
are copied into our param tree; the script checks that the two give the same logits before
timing. Then, interleaved in one process, for each batch size: ``prompt`` random tokens, then
``new`` greedy tokens, ``use_cache=True`` on their side; eager and compiled (ours:
``generate.decoder(compile=True)``; theirs: the static cache with ``torch.compile`` on the
forward), plus our cache-free sampler (the model rerun on the whole window per token).

    python -m benchmarks.generate [--batch 1 8] [--prompt 32] [--new 256] [--repeats 3]

Prints tokens/s (new tokens over all rows) as medians of ``--repeats`` runs, and the ratio to
Hugging Face eager (> 1: ours is faster). ``transformers`` is an optional dependency of this
benchmark only (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import functional_llm as fl
from functional_llm import generate as G
from functional_llm import random


def models(layers: int, d_model: int, heads: int, max_len: int):
    """The same random GPT-2 as ``GPT2LMHeadModel`` and as our ``GPT`` with its params."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_cfg = GPT2Config(n_layer=layers, n_embd=d_model, n_head=heads, n_positions=max_len,
                        activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)  # fmt: skip
    hf = GPT2LMHeadModel(hf_cfg).eval()
    cfg = fl.models.GPTConfig(vocab_size=hf_cfg.vocab_size, max_seq_len=max_len, d_model=d_model,
                              n_layers=layers, n_heads=heads, bias=True, dropout=0.0)  # fmt: skip
    ours = fl.models.GPT(cfg)
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    hd = d_model // heads
    blocks = []
    for i in range(layers):
        p = f"transformer.h.{i}."
        qkv_w, qkv_b = sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]
        q_w, k_w, v_w = qkv_w.reshape(d_model, 3, heads, hd).unbind(1)
        q_b, k_b, v_b = qkv_b.reshape(3, heads, hd).unbind(0)
        blocks.append({
            "attn_norm": {"scale": sd[p + "ln_1.weight"], "bias": sd[p + "ln_1.bias"]},
            "attn": {
                "q": {"w": q_w.contiguous(), "b": q_b.contiguous()},
                "k": {"w": k_w.contiguous(), "b": k_b.contiguous()},
                "v": {"w": v_w.contiguous(), "b": v_b.contiguous()},
                "o": {"w": sd[p + "attn.c_proj.weight"].reshape(heads, hd, d_model),
                      "b": sd[p + "attn.c_proj.bias"]},
            },
            "mlp_norm": {"scale": sd[p + "ln_2.weight"], "bias": sd[p + "ln_2.bias"]},
            "mlp": {"up": {"w": sd[p + "mlp.c_fc.weight"], "b": sd[p + "mlp.c_fc.bias"]},
                    "down": {"w": sd[p + "mlp.c_proj.weight"], "b": sd[p + "mlp.c_proj.bias"]}},
        })  # fmt: skip
    params = {
        "embed": {"table": sd["transformer.wte.weight"]},
        "pos": {"table": sd["transformer.wpe.weight"]},
        "blocks": blocks,
        "norm": {"scale": sd["transformer.ln_f.weight"], "bias": sd["transformer.ln_f.bias"]},
    }
    ours.check(params)
    return hf, ours, params


def median_tokens_per_s(run: Callable[[], object], tokens: int, repeats: int) -> float:
    run()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return tokens / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    width = args.prompt + args.new
    hf, model, params = models(args.layers, args.d_model, args.heads, width)
    probe = random.randint(random.key(1), (2, args.prompt), 0, model.config.vocab_size)
    with torch.no_grad():
        diff = (hf(probe).logits - model.apply(params, probe)).abs().max()
    print(f"GPT-2 {args.layers}x{args.d_model}, {fl.tree.size(params):,} params, prompt "
          f"{args.prompt}, {args.new} new tokens, greedy; {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; max |logit diff| vs HF: {diff:.2e}")  # fmt: skip
    compiled = None if args.no_compile else G.decoder(model, params, compile=True)
    rows = []
    for batch in args.batch:
        rows += one_batch(hf, model, params, compiled, batch, args)
    print("\n| batch | case | tokens/s | ratio to HF eager |\n|---|---|---|---|")
    print("\n".join(rows))


def one_batch(
    hf: Any, model: Any, params: Any, compiled: Any, batch: int, args: argparse.Namespace
) -> list[str]:
    """The table rows of one batch size."""
    prompt = random.randint(random.key(batch), (batch, args.prompt), 0, model.config.vocab_size)
    mask, n = torch.ones_like(prompt), batch * args.new

    def theirs(**kw: Any) -> Any:
        with torch.no_grad():
            return hf.generate(prompt, attention_mask=mask, max_new_tokens=args.new,
                               min_new_tokens=args.new, do_sample=False, use_cache=True,
                               pad_token_id=0, **kw)  # fmt: skip

    def ours(decode: Any = None) -> Any:
        return G.generate(model, params, prompt, max_new_tokens=args.new, decode=decode)

    same = torch.equal(ours().tokens, theirs())
    print(f"batch {batch}: greedy tokens identical to HF's: {same}")
    cases: dict[str, Callable[[], Any]] = {"HF generate, eager": theirs, "ours, eager": ours}
    results: dict[str, float] = {}
    if compiled is not None:
        cases["ours, compiled decode step"] = lambda: ours(compiled)
        cases["HF generate, static cache + compiled forward"] = lambda: theirs(
            cache_implementation="static"
        )
    forward = hf.forward
    try:
        for name, run in cases.items():
            if name.startswith("HF") and "compiled" in name:
                hf.forward = torch.compile(forward)
            results[name] = median_tokens_per_s(run, n, args.repeats)
    finally:
        hf.forward = forward
    window = lambda: G.sample(model, params, prompt, args.new, random.key(0), temperature=0)  # noqa: E731
    results["ours, no cache (window sampler)"] = median_tokens_per_s(window, n, 1)
    base = results["HF generate, eager"]
    return [f"| {batch} | {name} | {v:.1f} | {v / base:.2f} |" for name, v in results.items()]


if __name__ == "__main__":
    main()
