"""Talk to a chat model in the terminal: streamed tokens, the conversation kept as state.

    python -m experiments.chat out/chat_sft
    python -m experiments.chat out/chat_sft --temperature 0.7 --top-p 0.9 --seed 1
    python -m experiments.chat out/chat_sft --once "What does json.dumps do?"   # one answer

The run is a ``chat_sft`` output folder (its newest checkpoint, with the tokenizer and the
chat template's role tokens). Each answer is generated with the key/value cache, printed as it
is produced, and stops at ``<|end|>`` (or ``--max-new-tokens``). The conversation is a value:
each turn renders it whole with the template and the model continues it; when it no longer
fits the model's context, the oldest turns are dropped (the system message stays).

Commands: ``/reset`` forgets the conversation, ``/system TEXT`` sets the system message,
``/quit`` (or end of input) leaves.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import functional_llm as fl
from experiments import cli
from functional_llm import checkpoint, data, random
from functional_llm import generate as G
from functional_llm.data import chat


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("run", help="a chat_sft output folder")
    a("--once", help="answer this one question and exit (for scripts)")
    a("--system", help="a system message to start with")
    a("--max-new-tokens", type=cli.positive_int, default=128)
    a("--temperature", type=cli.nonnegative_float, default=0.0, help="0: greedy")
    a("--top-k", type=cli.positive_int)
    a("--top-p", type=cli.rate)
    a("--no-repeat-ngram", type=cli.nonnegative_int, default=3, help="0: off")
    a("--seed", type=int, default=0, help="the sampling key")
    args = p.parse_args(argv)
    if args.temperature == 0 and (args.top_k or args.top_p):
        p.error("--top-k and --top-p shape sampling: give a --temperature > 0")
    return args


def load(run: Path) -> tuple[Any, Any, chat.ChatTemplate]:
    """``(model, params, template)`` of a chat_sft run's newest checkpoint."""
    restored = cli.newest_checkpoint(run, "; train one with chat_sft")
    meta = restored.metadata
    if meta.get("template") != "chat":
        raise checkpoint.CheckpointError(f"{run}: not a chat model (train one with chat_sft)")
    if "tokenizer" not in meta:
        raise checkpoint.CheckpointError(f"{run}: the checkpoint holds no tokenizer")
    tok = data.tokenizer_from_json(meta["tokenizer"], f"{run}'s tokenizer")
    model = fl.nn.inference(
        fl.models.GPT(checkpoint.config_from_dict(fl.models.GPTConfig, meta["config"]))
    )
    return model, restored.state["params"], chat.ChatTemplate(tok)


def fit(template: chat.ChatTemplate, messages: list[dict], room: int) -> list[dict]:
    """The newest turns of ``messages`` whose prompt fits ``room`` tokens (system kept)."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    while len(turns) > 1 and len(template.prompt(system + turns)) > room:
        turns = turns[2:]  # the oldest question and its answer
    return system + turns


def answer(
    model: Any,
    params: Any,
    template: chat.ChatTemplate,
    messages: list[dict],
    args: argparse.Namespace,
    key: torch.Tensor,
    on_text: Callable[[str], None] = lambda text: None,
) -> str:
    """The assistant's reply to ``messages`` (ending with the user), streamed to ``on_text``."""
    room = model.config.max_seq_len - 1
    prompt = template.prompt(fit(template, messages, room))
    if len(prompt) > room:
        raise data.DataError(f"the question alone is {len(prompt)} tokens; the model reads {room}")
    new: list[int] = []
    shown = ""

    def stream(column: torch.Tensor) -> None:
        nonlocal shown
        token = int(column[0])
        if token >= template.base:  # <|end|> (or a role token): not text
            return
        new.append(token)
        text = template.tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # a byte-level token may end mid-character
            on_text(text[len(shown) :])
            shown = text

    G.generate(model, params, torch.as_tensor(prompt)[None],
               max_new_tokens=min(args.max_new_tokens, room + 1 - len(prompt)),
               key=key if args.temperature > 0 else None, temperature=args.temperature,
               top_k=args.top_k, top_p=args.top_p, eos_id=template.end_id, on_token=stream,
               processors=G.processors.no_repeat_ngram(args.no_repeat_ngram)
               if args.no_repeat_ngram else None)  # fmt: skip
    return template.tokenizer.decode(new).strip()


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    model, params, template = load(Path(args.run))
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages: list[dict] = list(system)
    key = random.key(args.seed)
    write = lambda text: (sys.stdout.write(text), sys.stdout.flush())  # noqa: E731
    if args.once is not None:
        chat.check_conversation([*messages, {"role": "user", "content": args.once}], "--once",
                                ends_with="user")  # fmt: skip
        reply = answer(model, params, template, [*messages, {"role": "user", "content": args.once}],
                       args, key, write)  # fmt: skip
        print()
        return reply
    print("chat: /reset forgets, /system TEXT sets the system message, /quit leaves")
    turn, reply = 0, ""
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return reply
        if not line:
            continue
        if line == "/quit":
            return reply
        if line == "/reset":
            messages = list(system)
            continue
        if line.startswith("/system"):  # an empty text removes the system message
            text = line.removeprefix("/system").strip()
            system = [{"role": "system", "content": text}] if text else []
            messages = system + [m for m in messages if m["role"] != "system"]
            continue
        messages.append({"role": "user", "content": line})
        write("bot> ")
        try:
            reply = answer(model, params, template, messages, args,
                           random.fold_in(key, turn), write)  # fmt: skip
        except data.DataError as err:
            print(f"\n(error: {err})")
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": reply or "..."})
        turn += 1


if __name__ == "__main__":
    cli.main_guard(main)
