"""Fine-tune a pretrained GPT to chat: supervised fine-tuning with the loss on the assistant only.

    python -m experiments.chat_sft --pretrained out/pretrain_gpt_bpe       # help-desk conversations
    python -m experiments.chat_sft --pretrained RUN --data chats.jsonl [--dev dev.jsonl]
    python -m experiments.chat out/chat_sft                                 # then talk to it

``--pretrained`` is a ``pretrain_gpt`` run (char, byte or BPE tokenizer). Conversations are
rendered with :class:`functional_llm.data.chat.ChatTemplate`: four role tokens are added after
the tokenizer's vocabulary and the model's embedding grows by four rows, initialised to the
mean row (:func:`functional_llm.finetune.resize_vocab`). The targets are the assistant's text
and its ``<|end|>``; with ``--pack`` (the default) several conversations share a row, each
attending only to itself (``segments``) with positions restarting at 0.

By default the conversations are made from the standard library's documentation
(:mod:`experiments.helpdesk`): what a function or class does, its signature, an example from
its docstring; modules are held out whole. ``--data`` takes JSON Lines in OpenAI's
``{"messages": [...]}`` or ShareGPT's format instead (every 10th line held out unless
``--dev``). A conversation the tokenizer cannot encode, or that does not fit the model's
context, is left out and counted.

Writes to ``--out-dir``: ``checkpoints/`` (the model with its config, tokenizer and template),
``metrics.jsonl``, ``curves.png`` and ``samples.txt``. At the end it prints the held-out loss on
the assistant's text before and after fine-tuning, and the ROUGE of greedy answers to held-out
first questions beside a retrieval baseline (the answer to the most similar training question).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import functional_llm as fl
from experiments import cli, helpdesk
from experiments.generate import load
from functional_llm import checkpoint, data, finetune, metrics, optim, random, runs, train
from functional_llm import generate as G
from functional_llm.data import chat
from functional_llm.types import IGNORE

OUTPUTS = ("checkpoints", "metrics.jsonl", "curves.png", "samples.txt")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--pretrained", required=True, help="a pretrain_gpt run folder or checkpoint")
    a("--data", help="conversations as JSON Lines (default: the stdlib help desk)")
    a("--dev", help="held-out conversations (default: every 10th of --data)")
    a("--out-dir", default="out/chat_sft")
    a("--max-steps", type=cli.positive_int, default=900)
    a("--batch-size", type=cli.positive_int, default=16, help="rows per step")
    a("--lr", type=cli.positive_float, default=3e-4)
    a("--warmup", type=cli.nonnegative_int, default=30)
    a("--dropout", type=cli.rate, default=0.0, help="dropout while fine-tuning")
    a("--pack", action=argparse.BooleanOptionalAction, default=True,
      help="several conversations per row, attention kept inside each (default on)")  # fmt: skip
    a("--eval-interval", type=cli.positive_int, default=100)
    a("--eval-size", type=cli.positive_int, default=200, help="held-out conversations for loss")
    a("--answer-size", type=cli.positive_int, default=1000, help="held-out questions answered")
    a("--max-new-tokens", type=cli.positive_int, default=96)
    a(
        "--no-repeat-ngram",
        type=cli.nonnegative_int,
        default=3,
        help="answers never repeat an n-gram (0: off)",
    )
    a("--seed", type=int, default=0)
    a("--threads", type=cli.positive_int)
    a("--overwrite", action="store_true", help="replace the outputs of an earlier run")
    a("--no-plot", action="store_true")
    cli.add_device_args(p)
    args = p.parse_args(argv)
    if args.dev and not args.data:
        p.error("--dev goes with --data")
    return args


def conversations(args: argparse.Namespace) -> tuple[list, list]:
    if args.data is None:
        return helpdesk.conversations(args.seed)
    convs = chat.read_conversations(args.data)
    if args.dev:
        return convs, chat.read_conversations(args.dev)
    held = [c for i, c in enumerate(convs) if i % 10 == 9]
    if not held:
        raise data.DataError(f"{args.data}: {len(convs)} conversations hold none out; give --dev")
    return [c for i, c in enumerate(convs) if i % 10 != 9], held


def encoded(template: chat.ChatTemplate, convs: Sequence, width: int, name: str) -> list[tuple]:
    """``(conversation, example)`` for each conversation that encodes and fits ``width + 1``."""
    out, unknown, long = [], 0, 0
    for c in convs:
        try:
            example = template.example(c)
        except data.DataError:
            unknown += 1
            continue
        if len(example["inputs"]) > width:
            long += 1
            continue
        out.append((c, example))
    if unknown or long:
        print(f"{name}: left out {unknown} conversations the tokenizer cannot encode and {long} "
              f"longer than the model's {width} tokens")  # fmt: skip
    if not out:
        raise data.DataError(f"{name}: no conversation fits the pretrained model")
    return out


def answer_loss(model: Any, params: Any, examples: Sequence[dict], end_id: int) -> float:
    """Mean cross-entropy on the assistant's text, ``<|end|>`` left out (a pretrained model
    has never seen that token, so it would not be a fair comparison)."""
    batches = []
    for at in range(0, len(examples), 32):
        batch = chat.pad_rows(examples[at : at + 32])
        targets = batch["targets"].masked_fill(batch["targets"] == end_id, IGNORE)
        batches.append({**batch, "targets": targets})
    step = train.make_eval_step(fl.losses.next_token(model))
    return train.evaluate(step, params, batches)["loss"]  # weighted by counted tokens


_WORDS = re.compile(r"[a-z0-9]+")


def _words(text: str) -> set[str]:
    return set(_WORDS.findall(text.lower()))


def retrieval(train_convs: Sequence, questions: Sequence[str]) -> list[str]:
    """The first answer of the training conversation whose first question is the most similar
    to each question: cosine of TF-IDF word vectors (dotted and underscored names split), so
    the words every question shares ("what does ... do") count for little."""
    asked = [_words(_first(c)[0]) for c in train_convs]
    idf = collections.Counter(w for words in asked for w in words)
    weight = {w: math.log(len(asked) / n) for w, n in idf.items()}
    norms = [math.sqrt(sum(weight[w] ** 2 for w in words)) or 1.0 for words in asked]
    out = []
    for q in questions:
        words = _words(q)
        scores = [
            sum(weight[w] ** 2 for w in words & a) / n for a, n in zip(asked, norms, strict=True)
        ]
        out.append(_first(train_convs[max(range(len(scores)), key=scores.__getitem__)])[1])
    return out


def _first(conv: Sequence[dict]) -> tuple[str, str]:
    """The first user question and the first answer of a conversation."""
    users = [m for m in conv if m["role"] == "user"]
    answers = [m for m in conv if m["role"] == "assistant"]
    return users[0]["content"], answers[0]["content"]


def _opening(conv: Sequence[dict]) -> list[dict]:
    """The conversation up to its first question (with its system message, if any)."""
    first_user = next(i for i, m in enumerate(conv) if m["role"] == "user")
    return list(conv[: first_user + 1])


def answers(model: Any, params: Any, template: chat.ChatTemplate, convs: Sequence,
            max_new_tokens: int, no_repeat_ngram: int = 0) -> list[str]:  # fmt: skip
    """Greedy answers to each conversation's first question, stopped at ``<|end|>``, never
    repeating an n-gram of ``no_repeat_ngram`` tokens (when > 0)."""
    processors = G.processors.no_repeat_ngram(no_repeat_ngram) if no_repeat_ngram else None
    out = []
    room = model.config.max_seq_len
    for conv in convs:
        prompt = torch.as_tensor(template.prompt(_opening(conv)))[None]
        n = min(max_new_tokens, room - prompt.shape[1])
        result = G.generate(model, params, prompt, max_new_tokens=max(n, 0),
                            eos_id=template.end_id, processors=processors)  # fmt: skip
        new = result.tokens[0, prompt.shape[1] :][result.valid[0, prompt.shape[1] :]].tolist()
        text = [i for i in new if i < template.base]
        out.append(template.tokenizer.decode(text).strip())
    return out


def paired_gain(ours: Sequence[str], theirs: Sequence[str],
                references: Sequence[str]) -> tuple[float, float]:  # fmt: skip
    """The mean per-question ROUGE-L difference ``ours - theirs`` and its standard error."""
    diff = [metrics.rouge([a], [r])["rougeL"] - metrics.rouge([b], [r])["rougeL"]
            for a, b, r in zip(ours, theirs, references, strict=True)]  # fmt: skip
    mean = sum(diff) / len(diff)
    var = sum((d - mean) ** 2 for d in diff) / max(len(diff) - 1, 1)
    return mean, math.sqrt(var / len(diff))


def plot(records: list[dict], path: Path) -> None:
    """The batch loss and the held-out answer loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    lines = (("loss", "-", "train (batch)"), ("answer_loss", "o-", "held-out answers"))
    for name, style, label in lines:
        kept = [r for r in records if name in r and not r.get("final")]
        ax.plot([r["step"] for r in kept], [r[name] for r in kept], style, label=label)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=path.parent.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pretrained, params, tok = load(Path(args.pretrained))
    template = chat.ChatTemplate(tok)
    width = pretrained.config.max_seq_len
    train_convs, dev_convs = conversations(args)
    train_set = encoded(template, train_convs, width, "training")
    dev_set = encoded(template, dev_convs, width, "held-out")
    out = runs.prepare(args.out_dir, resume=False, overwrite=args.overwrite, outputs=OUTPUTS)
    model, params = finetune.resize_vocab(pretrained, params, template.vocab_size)
    model = fl.models.GPT(dataclasses.replace(model.config, dropout=args.dropout))
    evaluated = fl.nn.inference(model)
    dev_examples = [e for _, e in dev_set[: args.eval_size]]
    # before fine-tuning: the pretrained model, its four new rows the mean row (never predicted
    # better than the old tokens, so the answer loss is the pretrained model's, up to them)
    before = answer_loss(evaluated, params, dev_examples, template.end_id)
    examples = [e for _, e in train_set]
    rows = chat.pack(examples, width) if args.pack else chat.pad_rows(examples, width)
    n_rows = rows["inputs"].shape[0]
    print(f"{len(train_set):,} training conversations in {n_rows:,} rows of {width} tokens "
          f"({'packed' if args.pack else 'one per row'}); {len(dev_set):,} held out")  # fmt: skip

    schedule = optim.warmup_cosine(args.lr, args.warmup, args.max_steps)
    opt = optim.adamw(schedule, weight_decay=0.1)
    where = cli.device(args)
    step = cli.on_device(train.make_step(fl.losses.next_token(model), opt, clip_norm=1.0,
                                         donate=True), where)  # fmt: skip
    state = cli.to_device(train.init_state(params, opt, random.key(args.seed + 1)), where)
    log = runs.MetricsLog(out / "metrics.jsonl")
    log.record({"step": 0, "answer_loss": before})
    k_order = random.key(args.seed + 2)
    started, epoch, order = time.perf_counter(), 0, []
    with runs.interruptible() as stop:
        for s in tqdm(range(1, args.max_steps + 1), mininterval=1):
            if len(order) < args.batch_size:
                order += random.permutation(random.fold_in(k_order, epoch), n_rows).tolist()
                epoch += 1
            pick, order = order[: args.batch_size], order[args.batch_size :]
            batch = {k: v[pick] for k, v in rows.items()}
            state, m = step(state, cli.to_device(batch, where))
            if s % 10 == 0:
                log.record({"step": s, "loss": float(m["loss"])})
            if s % args.eval_interval == 0 and s < args.max_steps:
                loss = answer_loss(evaluated, state.params, dev_examples, template.end_id)
                log.record({"step": s, "answer_loss": loss})
            if stop:
                break
    trained = state.params
    train_s = time.perf_counter() - started
    after = answer_loss(evaluated, trained, dev_examples, template.end_id)
    log.record({"step": int(state.step), "answer_loss": after})
    ckpts = checkpoint.Checkpointer(out / "checkpoints", keep=1)
    ckpts.save(int(state.step), {"params": trained},
               {"config": checkpoint.config_to_dict(model.config), "tokenizer": tok.to_json(),
                "template": "chat", "args": vars(args)})  # fmt: skip

    asked = [c for c, _ in dev_set[: args.answer_size]]
    references = [_first(c)[1] for c in asked]
    ours = answers(evaluated, trained, template, asked, args.max_new_tokens, args.no_repeat_ngram)
    baseline = retrieval([c for c, _ in train_set], [_first(c)[0] for c in asked])
    scores = {"model": metrics.rouge(ours, references),
              "retrieval": metrics.rouge(baseline, references)}  # fmt: skip
    gain, gain_se = paired_gain(ours, baseline, references)
    result = {"answer_loss_before": before, "answer_loss_after": after, "train_s": train_s,
              "rougeL": scores["model"]["rougeL"], "params": fl.tree.size(trained),
              "retrieval_rougeL": scores["retrieval"]["rougeL"], "rougeL_gain": gain,
              "rougeL_gain_se": gain_se}  # fmt: skip
    log.record({"final": True, **result, "rouge": scores})
    shown = list(zip(asked, ours, references, baseline, strict=True))[:20]
    samples = [f"Q: {_first(c)[0]}\nmodel:     {o}\nreference: {r}\nretrieval: {b}\n"
               for c, o, r, b in shown]  # fmt: skip
    (out / "samples.txt").write_text("\n".join(samples), encoding="utf-8")
    if not args.no_plot:
        plot(log.records, out / "curves.png")
    log.close()
    print(f"held-out loss on answers: {before:.3f} before fine-tuning, {after:.3f} after "
          f"({train_s:.0f} s)")  # fmt: skip
    for name, r in scores.items():
        print(f"{name:>9}: ROUGE-1 {r['rouge1']:.1f}  ROUGE-2 {r['rouge2']:.1f}  "
              f"ROUGE-L {r['rougeL']:.1f}")  # fmt: skip
    print(f"ROUGE-L of the model minus retrieval, per question: {gain:+.2f} "
          f"(standard error {gain_se:.2f}, {len(asked)} questions)")  # fmt: skip
    print("\n" + "\n".join(samples[:3]))
    return result


if __name__ == "__main__":
    cli.main_guard(main)
