"""The model families at their published sizes, and a parity check against torch.nn.

Sizes come from ``eval_shape`` (the meta device): no memory is allocated, so a 7B model is
counted in milliseconds. Then tiny instances of each family run forward eagerly and compiled,
and ``torch.nn.Transformer`` is converted and compared on random inputs.

    python -m experiments.model_zoo [--no-compile]
"""

from __future__ import annotations

import argparse
import time

import torch

import functional_llm as fl
from experiments import cli
from functional_llm import models
from functional_llm.interop import torch_nn

PUBLISHED = {  # name: (model, parameter count reported by its authors)
    "GPT-2 small": (models.GPT(models.GPTConfig.gpt2("small")), 124_439_808),
    "GPT-2 medium": (models.GPT(models.GPTConfig.gpt2("medium")), 354_823_168),
    "GPT-2 XL": (models.GPT(models.GPTConfig.gpt2("xl")), 1_557_611_200),
    "Llama-2 7B": (
        models.GPT(
            models.GPTConfig.llama(
                d_model=4096, n_layers=32, n_heads=32, d_ff=11008, max_seq_len=4096
            )
        ),
        6_738_415_616,
    ),
    "BERT-base (pretraining heads)": (models.BERT(models.BERTConfig.base()), 110_106_428),
    "Transformer-base (37k vocab, untied embeddings)": (
        models.Transformer(models.TransformerConfig(src_vocab_size=37000, tgt_vocab_size=37000)),
        None,
    ),
}


def sizes() -> None:
    print(f"{'model':<52} {'parameters':>15} {'published':>15}  check")
    for name, (model, published) in PUBLISHED.items():
        start = time.perf_counter()
        n = fl.tree.size(model.shapes())
        ms = (time.perf_counter() - start) * 1e3
        check = "-" if published is None else ("ok" if n == published else "MISMATCH")
        print(f"{name:<52} {n:>15,} {published or '':>15}  {check}  ({ms:.0f} ms)")


def forward(compile_too: bool, device: torch.device, dtype: torch.dtype) -> None:
    shape = dict(vocab_size=256, max_seq_len=64, d_model=64, n_layers=2, n_heads=4, dtype=dtype)
    tiny = {
        "gpt2": models.GPT(models.GPTConfig.gpt2(**shape)),
        "llama": models.GPT(models.GPTConfig.llama(**shape, n_kv_heads=2)),
    }
    tokens = fl.random.randint(fl.random.key(1, device), (4, 64), 0, 256)
    for name, model in tiny.items():
        params = model.init(fl.random.key(0, device))
        eager = model.apply(params, tokens)
        line = f"{name:<6} logits {tuple(eager.shape)}"
        if compile_too:
            compiled = torch.compile(model.apply, fullgraph=True)(params, tokens)
            line += f", compiled - eager max |diff| = {(compiled - eager).abs().max():.2e}"
        print(line)


def parity() -> None:
    torch.manual_seed(0)
    module = torch.nn.Transformer(d_model=64, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                                  dim_feedforward=128, batch_first=True).eval()  # fmt: skip
    model, params = torch_nn.from_transformer(module)
    model = fl.nn.inference(model)  # the module is in eval mode: no dropout
    src, tgt = torch.randn(3, 10, 64), torch.randn(3, 7, 64)
    causal = fl.nn.causal_mask(7)
    want = module(src, tgt, tgt_mask=~causal)
    got = model.apply(params, src, tgt, causal=True)
    print(f"nn.Transformer -> EncoderDecoder: max |diff| = {(got - want).abs().max():.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile run")
    cli.add_device_args(parser)
    args = parser.parse_args()
    sizes()
    forward(not args.no_compile, cli.device(args), cli.dtype(args))
    parity()


if __name__ == "__main__":
    main()
