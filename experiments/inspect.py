"""Look inside a trained model: attention maps, token attributions and the logit lens, drawn.

    python -m experiments.inspect out/pretrain_gpt --text "def main("        # a GPT run
    python -m experiments.inspect out/finetune_classify --text "a gorgeous, witty film"
    python -m experiments.inspect out/pretrain_bert --text "the cat sat on the [MASK] ."
    python -m experiments.inspect path/to/gpt2 --text "Hello, my dog" --target " is"  # HF folder

The model is a ``pretrain_gpt`` run (or checkpoint file, or a Hugging Face GPT-2/Llama folder),
a ``pretrain_bert`` run, a ``finetune_classify`` run, or a ``translate``/``summarize`` run. What
is explained is its prediction: a GPT's next token after the text (``--target`` names
another), a classifier's label (``--target`` names another label), BERT's word at the first
``[MASK]`` (else at the last word), an encoder-decoder's greedy output for the text as its
source (the output's log-likelihood, attributed to the source tokens; the attention drawn is
the decoder's cross-attention, output by source token).

Writes into ``--out`` (default ``<run>/inspect``):

* ``attention.png``: every head of ``--layer`` (default the last), query by attended token;
* ``attribution.html`` and ``attribution.png``: which tokens made the prediction (integrated
  gradients on the token embeddings, ``--steps`` Gauss-Legendre nodes; red raised it);
* ``lens.png`` (GPT, BERT and a translator without a copy head): each layer's top token at
  each position, read through the model's own head (the logit lens), shaded by its
  probability. A copy head's output depends on the source too, which a lens cannot read.

Prints the prediction, the completeness error of the attributions and the strongest tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

import functional_llm as fl
from experiments import cli, seq2seq_task
from experiments.generate import load as load_gpt
from functional_llm import checkpoint, data, interpret
from functional_llm import generate as G
from functional_llm.interpret import pictures

OUTPUTS = ("attention.png", "attribution.html", "attribution.png", "lens.png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("model", help="a run folder (pretrain_gpt, pretrain_bert, finetune_classify), a "
      "checkpoint file or a Hugging Face GPT folder")  # fmt: skip
    a("--text", required=True, help="the text to explain")
    a("--target", help="explain this next token (GPT) or label (classifier) instead")
    a("--layer", type=int, default=-1, help="the block whose attention is drawn (default last)")
    a("--steps", type=cli.positive_int, default=64, help="integrated-gradients nodes")
    a("--out", help="folder for the pictures (default <model>/inspect)")
    a("--overwrite", action="store_true", help="replace the pictures of an earlier inspect")
    return p.parse_args(argv)


@dataclasses.dataclass
class Subject:
    """A loaded model with what explaining it needs."""

    kind: str  # "gpt", "bert", "classifier" or "seq2seq"
    model: Any
    params: Any
    tok: Any
    labels: list[str] = dataclasses.field(default_factory=list)


def load(where: Path) -> Subject:
    seq2seq = _seq2seq(where)
    if seq2seq is not None:
        return seq2seq
    if (where / "bert.safetensors").exists():
        meta = checkpoint.metadata(where / "bert.safetensors")
        model = fl.models.BERT(checkpoint.config_from_dict(fl.models.BERTConfig, meta["config"]))
        params = checkpoint.load(where / "bert.safetensors", like=model.shapes())
        return Subject("bert", model, params, data.load_tokenizer(where / "tokenizer.json"))
    if (where / "model.safetensors").exists() and not (where / "config.json").exists():
        return _classifier(where / "model.safetensors")
    model, params, tok = load_gpt(where)
    return Subject("gpt", model, params, tok)


def _seq2seq(where: Path) -> Subject | None:
    """A translate or summarize run (its newest checkpoint holds an encoder-decoder's config)."""
    if not (where / "checkpoints").is_dir():
        return None
    restored = checkpoint.Checkpointer(where / "checkpoints").restore()
    if restored is None or "src_vocab_size" not in restored.metadata.get("config", {}):
        return None
    return Subject("seq2seq", *seq2seq_task.trained(restored, str(where)))


def _classifier(path: Path) -> Subject:
    meta = checkpoint.metadata(path)
    if meta.get("task") != "classify" or "tokenizer" not in meta:
        raise checkpoint.CheckpointError(
            f"{path}: not a classifier saved by finetune_classify (rerun it to record its "
            "tokenizer, backbone and labels)"
        )
    if meta["args"].get("lora_rank"):
        raise checkpoint.CheckpointError(f"{path}: holds LoRA adapters; inspect a merged model")
    gpt = meta["backbone"] == "gpt"
    cls, cfg = (
        (fl.models.GPT, fl.models.GPTConfig) if gpt else (fl.models.BERT, fl.models.BERTConfig)
    )
    backbone = cls(checkpoint.config_from_dict(cfg, meta["config"]))
    pooling = meta.get("pooling", "backbone")  # runs saved before --pooling pooled the backbone's
    model = fl.models.SequenceClassifier(backbone, num_labels=len(meta["labels"]), pooling=pooling)
    params = checkpoint.load(path, like=model.shapes())
    tok = data.tokenizer_from_json(meta["tokenizer"], f"{path}'s tokenizer")
    return Subject("classifier", model, params, tok, list(meta["labels"]))


def _piece(tok: Any, i: int) -> str:
    """A token as a readable label: spaces and newlines shown."""
    text = tok.token(i) if hasattr(tok, "token") else tok.decode([i])
    text = text.replace("\u0120", " ").replace("\u010a", "\n")  # byte-level BPE's space, newline
    return text.replace("\n", "\\n").replace(" ", "\u2423") or "\u2205"


def _ids(tok: Any, text: str, flag: str) -> list[int]:
    try:
        return list(tok.encode(text))
    except ValueError as err:  # a character the tokenizer has never seen
        raise data.DataError(f"{flag} cannot be encoded: {err}") from None


def _encode(s: Subject, text: str) -> dict[str, torch.Tensor]:
    if s.kind in ("gpt", "seq2seq"):
        ids = _ids(s.tok, text, "--text")
        limit = s.model.config.max_seq_len
    else:
        enc = s.tok.encode_example(text)
        ids = list(enc.ids)
        limit = (s.model.backbone if s.kind == "classifier" else s.model).config.max_seq_len
    if not ids:
        raise data.DataError("--text encodes to no tokens")
    if len(ids) > limit:
        raise data.DataError(f"--text has {len(ids)} tokens; the model reads {limit}")
    return {"tokens": torch.tensor([ids])}


def _target(s: Subject, args: argparse.Namespace, tokens: torch.Tensor) -> tuple[Any, str, str]:
    """The attribution target (a function of ``apply``'s output), its description and the
    model's own prediction."""
    model, params = s.model, s.params
    with torch.no_grad():
        out = model.apply(params, tokens)
    if s.kind == "classifier":
        predicted = s.labels[int(out[0].argmax())]
        name = args.target or predicted
        if name not in s.labels:
            raise data.DataError(f"--target {name!r} is not a label; the labels are {s.labels}")
        return interpret.log_prob(s.labels.index(name), position=None), f"label {name!r}", predicted
    if s.kind == "gpt":
        predicted = _piece(s.tok, int(out[0, -1].argmax()))
        if args.target is None:
            index = int(out[0, -1].argmax())
        else:
            ids = _ids(s.tok, args.target, "--target")
            if len(ids) != 1:
                raise data.DataError(f"--target {args.target!r} is {len(ids)} tokens; give one")
            index = ids[0]
        return interpret.log_prob(index), f"next token {_piece(s.tok, index)!r}", predicted
    ids = tokens[0].tolist()
    mask_id = s.tok.id_of("mask")
    at = ids.index(mask_id) if mask_id in ids else len(ids) - 2  # the last word before [SEP]
    logits = model.mlm_logits(params, out.hidden)[0, at]
    index = int(logits.argmax())
    pick = interpret.log_prob(index, position=at)
    target = lambda o: pick(model.mlm_logits(params, o.hidden))  # noqa: E731
    return target, f"word {_piece(s.tok, index)!r} at position {at}", _piece(s.tok, index)


def _translation(s: Subject, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's greedy output for ``src`` as the decoder's input ``(1, n + 1)`` (the start
    token, then the output) and what it predicts there ``(1, n + 1)`` (the output, then EOS)."""
    eos = s.tok.id_of("eos")
    start = torch.full((1, 1), eos)
    room = s.model.config.max_seq_len - 1
    out = G.generate(s.model, s.params, start, src=src, max_new_tokens=room, eos_id=eos)
    ids = out.tokens[0][out.valid[0]][1:].tolist()
    ids = ids[:-1] if ids and ids[-1] == eos else ids
    return torch.tensor([[eos, *ids]]), torch.tensor([[*ids, eos]])


def _sequence_log_prob(gold: torch.Tensor) -> Any:
    """``sum_t log p(gold_t)`` of ``(1, T, V)`` logits: the whole output's log-likelihood."""
    return lambda logits: (
        torch.log_softmax(logits.float(), -1).gather(-1, gold[..., None]).sum((1, 2))
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    where = Path(args.model)
    s = load(where)
    s.model = fl.nn.inference(s.model)
    out = Path(args.out) if args.out else (where if where.is_dir() else where.parent) / "inspect"
    fl.runs.prepare(out, resume=False, overwrite=args.overwrite, outputs=OUTPUTS)
    tokens = _encode(s, args.text)["tokens"]
    labels = [_piece(s.tok, i) for i in tokens[0].tolist()]
    try:
        layer = interpret.check_layer(s.params, args.layer)
    except IndexError as err:
        raise data.DataError(f"--layer: {err}") from None
    if s.kind == "seq2seq":  # explain the greedy output: cross-attention, source attributions
        tgt_in, gold = _translation(s, tokens)
        inputs, rows, kind, table = (
            (tokens, tgt_in),
            [_piece(s.tok, i) for i in tgt_in[0]],
            "cross",
            "src_embed",
        )
        predicted = s.tok.decode(gold[0, :-1].tolist())
        target, what = _sequence_log_prob(gold), f"the output {predicted!r}"
    else:
        inputs, rows, kind, table = (tokens,), labels, "attn", "embed"
        target, what, predicted = _target(s, args, tokens)

    weights = interpret.attention_weights(s.model, s.params, *inputs, kind=kind)[layer][0]
    pictures.attention_heatmaps(weights, rows, labels, path=out / "attention.png",
                                title=f"{kind} attention of block {layer}")  # fmt: skip
    ig = interpret.token_attributions(s.model, s.params, *inputs, target=target,
                                      embedding=table, steps=args.steps)  # fmt: skip
    title = f"integrated gradients of log p({what})"
    pictures.attribution_html(labels, ig.values[0], out / "attribution.html", title=title)
    pictures.attribution_png(labels, ig.values[0], out / "attribution.png", title=title)
    written = ["attention.png", "attribution.html", "attribution.png"]
    copying = getattr(getattr(s.model, "config", None), "copy_source", False)
    if copying:
        print("no lens.png: the copy head's output depends on the source as well")
    if s.kind != "classifier" and not copying:
        probs = interpret.logit_lens(s.model, s.params, *inputs)[:, 0].softmax(-1)
        top_p, top_i = probs.max(-1)
        grid = [[_piece(s.tok, i) for i in row] for row in top_i.tolist()]
        pictures.lens_grid(grid, top_p, rows, out / "lens.png",
                           title="logit lens: each layer's top next token")  # fmt: skip
        written.append("lens.png")
    order = ig.values[0].abs().argsort(descending=True)[:5].tolist()
    strongest = ", ".join(f"{labels[i]} {float(ig.values[0, i]):+.3f}" for i in order)
    print(f"prediction: {predicted}; explained: {what}")
    print(f"attributions (completeness error {float(ig.delta[0]):.2e}): {strongest}")
    print(f"wrote {', '.join(written)} to {out}")
    return {"prediction": predicted, "delta": float(ig.delta[0]), "out": str(out)}


if __name__ == "__main__":
    cli.main_guard(main)
