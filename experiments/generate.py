"""Generate text from a trained GPT: greedy, sampled or beam search, with the key/value cache.

    python -m experiments.generate out/pretrain_gpt --prompt "def main(" --max-new-tokens 200
    python -m experiments.generate out/pretrain_gpt --prompt "import " --temperature 0.8 \\
        --top-p 0.95 --repetition-penalty 1.2 --stream
    python -m experiments.generate out/pretrain_gpt --prompt-file start.py --num-beams 4 \\
        --num-return 2 --stop "\\n\\n"
    python -m experiments.generate CHECKPOINT.safetensors --prompt "a" --prompt "b" --compile
    python -m experiments.generate path/to/gpt2 --prompt "Hello, my dog"   # a Hugging Face folder
    python -m experiments.generate out/code_fim --prompt "def add(a, b):\n    " \
        --suffix "\n\nprint(add(1, 2))"              # infill (pretrained with --fim-rate)

The checkpoint is a ``pretrain_gpt`` output folder (its newest intact checkpoint), one
checkpoint file, or a local Hugging Face GPT-2 or Llama folder (``config.json``,
``model.safetensors``, ``tokenizer.json``); the model's config and tokenizer come from it. Several
``--prompt`` flags decode as one left-padded batch. ``--temperature 0`` (the default) is greedy;
otherwise each prompt samples with its own key (``--seed``), so its text does not depend on
the batch. Prints each continuation and the decoding speed in tokens per second.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

import functional_llm as fl
from experiments import cli
from functional_llm import checkpoint, data, random
from functional_llm import generate as G
from functional_llm.interop import hf


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("checkpoint", help="a pretrain_gpt output folder or a checkpoint file")
    a("--prompt", action="append", default=[], help="a prompt (repeatable: one batch)")
    a("--prompt-file", help="a UTF-8 file whose whole text is one more prompt")
    a("--max-new-tokens", type=cli.positive_int, default=200)
    a("--temperature", type=cli.nonnegative_float, default=0.0, help="0: greedy")
    a("--top-k", type=cli.positive_int, default=None)
    a("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1]")
    a("--min-p", type=float, default=None, help="in (0, 1]")
    a("--repetition-penalty", type=cli.positive_float, default=None)
    a("--no-repeat-ngram", type=cli.positive_int, default=None)
    a("--num-beams", type=cli.positive_int, default=1, help="> 1: beam search")
    a("--num-return", type=cli.positive_int, default=1, help="beam search: hypotheses shown")
    a("--length-penalty", type=float, default=1.0)
    a("--stop", action="append", default=[], help="stop a prompt's text at this string")
    a("--seed", type=cli.nonnegative_int, default=0)
    a("--compile", action="store_true", help="torch.compile the decode step (once)")
    a("--stream", action="store_true", help="print tokens as they come (one prompt)")
    a(
        "--suffix",
        help="infill: write what goes between --prompt and this text (a model "
        "pretrained with --fim-rate)",
    )
    cli.add_device_args(p)
    args = p.parse_args(argv)
    for name in ("top_p", "min_p"):
        value = getattr(args, name)
        if value is not None and not 0 < value <= 1:
            p.error(f"--{name.replace('_', '-')} must be in (0, 1], got {value}")
    if args.num_beams > 1 and (args.temperature or args.top_k or args.top_p or args.min_p):
        p.error("--num-beams searches; the sampling flags (--temperature, --top-*) do not apply")
    if args.num_return > args.num_beams:
        p.error(f"--num-return {args.num_return} is more than --num-beams {args.num_beams}")
    if args.temperature == 0 and (args.top_k or args.top_p or args.min_p):
        p.error("--top-k, --top-p and --min-p shape sampling: give a --temperature > 0")
    if args.suffix is not None and (
        len(args.prompt) != 1 or args.prompt_file or args.num_beams > 1
    ):
        p.error("--suffix infills between one --prompt and it (greedy or sampled)")
    if args.stream and (args.num_beams > 1 or len(args.prompt) + bool(args.prompt_file) > 1):
        p.error("--stream prints one prompt's greedy or sampled tokens")
    return args


def load(where: Path) -> tuple[Any, Any, Any]:
    """``(model, params, tokenizer)`` from a checkpoint file or a run folder's newest intact
    checkpoint (the config and tokenizer are the ones the checkpoint recorded), or from a
    Hugging Face model folder."""
    if (where / "config.json").exists():
        return load_hf(where)
    if where.is_dir():
        restored = cli.newest_checkpoint(where)
        path, meta, saved = where / "checkpoints", restored.metadata, restored.state
    else:
        path, meta, saved = where, checkpoint.metadata(where), checkpoint.load(where)
    config = meta.get("config", {})
    if "n_layers" not in config or "vocab_size" not in config:
        raise checkpoint.CheckpointError(
            f"{path}: not a GPT checkpoint (its config has {sorted(config)[:6]}...); only "
            "decoder-only models from pretrain_gpt generate here"
        )
    model = fl.models.GPT(checkpoint.config_from_dict(fl.models.GPTConfig, config))
    params = cli.trained_params(model, saved)
    if "tokenizer" in meta:
        tok = data.tokenizer_from_json(meta["tokenizer"], f"{path}'s tokenizer")
    else:  # a checkpoint written before checkpoints held their tokenizer
        folder = where if where.is_dir() else where.parent.parent  # run/checkpoints/step_*
        tok = data.load_tokenizer(folder / "tokenizer.json")
    return model, params, tok


def load_hf(folder: Path) -> tuple[Any, Any, Any]:
    """``(model, params, tokenizer)`` of a Hugging Face GPT-2 or Llama folder."""
    model, params = hf.load(folder)
    if not isinstance(model, fl.models.GPT):
        raise hf.MappingError(f"{folder}: a {type(model).__name__}; generation here is for "
                              "decoder-only models (GPT-2, Llama)")  # fmt: skip
    if not (folder / "tokenizer.json").exists():
        raise data.DataError(f"{folder}: no tokenizer.json beside the model")
    return model, params, data.load_tokenizer(folder)


def infill(model: Any, params: Any, tok: Any, args: argparse.Namespace) -> dict[str, float]:
    """The middle between ``--prompt`` and ``--suffix``, in fill-in-the-middle order."""
    fim = data.fim.FIM(tok.vocab_size)
    if model.config.vocab_size != fim.vocab_size:
        raise data.DataError(f"{args.checkpoint}: the model reads {model.config.vocab_size} ids, "
                             f"not the tokenizer's {tok.vocab_size} + 4 sentinels: pretrain "
                             "with --fim-rate to infill")  # fmt: skip
    where = fl.tree.leaves(params)[0].device
    try:
        prefix, suffix = (torch.as_tensor(tok.encode(t)) for t in (args.prompt[0], args.suffix))
    except ValueError as err:
        raise data.DataError(f"the prompt cannot be encoded: {err}") from None
    prompt = fim.prompt(prefix, suffix)[None].to(where)
    n = min(args.max_new_tokens, model.config.max_seq_len - prompt.shape[1])
    if n < 1:
        raise data.DataError(f"prefix and suffix are {prompt.shape[1]} tokens with the sentinels; "
                             f"the model reads {model.config.max_seq_len}")  # fmt: skip
    key = random.key(args.seed, where) if args.temperature else None
    started = time.perf_counter()
    out = G.generate(model, params, prompt, max_new_tokens=n, key=key, eos_id=fim.id("end"),
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)  # fmt: skip
    new = out.tokens[0, prompt.shape[1] :][out.valid[0, prompt.shape[1] :]].tolist()
    seconds = time.perf_counter() - started
    middle = tok.decode([i for i in new if i < tok.vocab_size])
    print(f"--- infilled ---\n{args.prompt[0]}\u27e8{middle}\u27e9{args.suffix}")
    stopped = float(len(new) < n)  # at <EOM> (not kept among the valid tokens), not the limit
    return {"tokens": len(new), "tokens_per_s": len(new) / seconds, "middle_chars": len(middle),
            "stopped": stopped}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    model, params, tok = load(Path(args.checkpoint))
    where = cli.device(args)
    model = fl.models.GPT(dataclasses.replace(model.config, dtype=cli.dtype(args)))
    params = cli.to_device(params, where, cli.dtype(args))
    if args.suffix is not None:
        return infill(model, params, tok, args)
    texts = list(args.prompt) + ([data.read_text(args.prompt_file)] if args.prompt_file else [])
    if not texts:
        raise data.DataError("give a --prompt or a --prompt-file")
    try:
        ids = [list(tok.encode(t)) for t in texts]
    except ValueError as err:  # a character the tokenizer has never seen
        raise data.DataError(f"the prompt cannot be encoded: {err}") from None
    tokens, valid = cli.to_device(G.left_pad(ids), where)
    room = model.config.max_seq_len - tokens.shape[1]
    if room < 1:
        raise data.DataError(f"the prompt has {tokens.shape[1]} tokens; the model reads "
                             f"{model.config.max_seq_len}")  # fmt: skip
    n = min(args.max_new_tokens, room)
    if n < args.max_new_tokens:
        print(f"--max-new-tokens cut to {n}: the model reads {model.config.max_seq_len} tokens")
    processors = [
        G.processors.repetition_penalty(args.repetition_penalty) if args.repetition_penalty
        else None,
        G.processors.no_repeat_ngram(args.no_repeat_ngram) if args.no_repeat_ngram else None,
        G.processors.min_p(args.min_p) if args.min_p else None,
    ]  # fmt: skip
    chain = G.processors.chain(*[q for q in processors if q is not None])
    stop = G.stop_strings(tok.decode, args.stop, tokens.shape[1]) if args.stop else None
    started = time.perf_counter()
    if args.num_beams > 1:
        out = G.beam_search(model, params, tokens, valid, num_beams=args.num_beams,
                            num_return=args.num_return, max_new_tokens=n,
                            length_penalty=args.length_penalty, processors=chain)  # fmt: skip
        rows = [[(r[ok].tolist(), float(s)) for r, ok, s in zip(t, v, sc, strict=True)]
                for t, v, sc in zip(out.tokens, out.valid, out.scores, strict=True)]  # fmt: skip
        produced = int(out.valid[:, 0].sum())
    else:
        key = random.split(random.key(args.seed, where), len(texts)) if args.temperature else None
        streamed: list[int] = []

        def show(column: torch.Tensor) -> None:  # --stream: print what the new token adds
            before = len(tok.decode(streamed))
            streamed.append(int(column[0]))
            print(tok.decode(streamed)[before:], end="", flush=True)

        decode = G.decoder(model, params, compile=args.compile)
        out = G.generate(model, params, tokens, valid, max_new_tokens=n, key=key,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         processors=chain, stop=stop, decode=decode,
                         on_token=show if args.stream else None)  # fmt: skip
        new, real = out.tokens[:, tokens.shape[1] :], out.valid[:, tokens.shape[1] :]
        rows = [[(r[ok].tolist(), None)] for r, ok in zip(new, real, strict=True)]
        produced = int(real.sum())
        if args.stream:
            print()
    seconds = time.perf_counter() - started
    for text, hyps in zip(texts, rows, strict=True):
        for rank, (new_ids, score) in enumerate(hyps):
            body = tok.decode(new_ids)
            for s in args.stop:  # the continuation ends before its stop string
                body = body.split(s)[0]
            label = "" if score is None else f" (#{rank + 1}, score {score:.3f})"
            if not args.stream:
                print(f"--- {text!r}{label} ---\n{text}{body}")
    speed = produced / seconds
    print(f"{produced} tokens in {seconds:.2f} s: {speed:.1f} tokens/s")
    return {"tokens": produced, "tokens_per_s": speed}


if __name__ == "__main__":
    cli.main_guard(main)
