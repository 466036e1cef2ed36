"""Conversations for chat fine-tuning: messages, a chat template with role tokens, and packing.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content":
str}``: an optional system message, then user and assistant turns in alternation, starting with
the user. :func:`read_conversations` reads JSON Lines in the formats users have: OpenAI's
fine-tuning files (``{"messages": [...]}``) and ShareGPT's (``{"conversations": [{"from":
"human" | "gpt" | "system", "value": ...}]}``).

:class:`ChatTemplate` renders a conversation as token ids, each message as

    <|role|> content <|end|>

where the four role and end tokens are new ids after the tokenizer's own vocabulary (the model's
embedding grows by four rows: :func:`functional_llm.finetune.resize_vocab`), so no text can
forge them. For supervised fine-tuning the targets are the assistant's content and its
``<|end|>`` (the model learns to answer and to stop); every other position is ``IGNORE``.
Rendering is a pure function and :meth:`ChatTemplate.parse` inverts it.

:func:`pack` lays several conversations into one row of ``width`` tokens, each with its own
``segments`` id and positions restarting at 0, so that a GPT keeps attention inside each one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from functional_llm.data.reading import DataError
from functional_llm.data.transforms import pad_batch
from functional_llm.types import IGNORE

__all__ = [
    "ROLES",
    "ChatTemplate",
    "check_conversation",
    "pack",
    "pad_rows",
    "read_conversations",
]

ROLES = ("system", "user", "assistant")
_SHAREGPT = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
             "system": "system"}  # fmt: skip


def check_conversation(
    messages: Any, where: str = "conversation", *, ends_with: str | None = "assistant"
) -> list[dict[str, str]]:
    """``messages`` as a validated list, or a :class:`DataError` naming ``where`` and the
    message: a known role, non-empty text content, the system message only first, user and
    assistant alternating from the user, and the last turn ``ends_with``'s (None: either)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: a conversation is a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or set(m) - {"role", "content", "name", "weight"}:
            raise DataError(f"{where}: message {i} must be {{'role': ..., 'content': ...}}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}; roles are {list(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: message {i} ({role}) has no text content")
        out.append({"role": role, "content": content})
    turns = out[1:] if out[0]["role"] == "system" else out
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            at = i + len(out) - len(turns)
            raise DataError(f"{where}: message {at} is {m['role']!r} where the turn order "
                            f"(system?, user, assistant, ...) needs {expected!r}")  # fmt: skip
    if not turns:
        raise DataError(f"{where}: a system message alone is no conversation")
    if ends_with is not None and turns[-1]["role"] != ends_with:
        raise DataError(f"{where}: the last message is the {turns[-1]['role']}'s; it must be "
                        f"the {ends_with}'s")  # fmt: skip
    return out


def _messages(record: Any) -> Any:
    if isinstance(record, Mapping) and "messages" in record:
        return record["messages"]
    if isinstance(record, Mapping) and "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            return turns
        return [
            {"role": _SHAREGPT.get(str(t.get("from")), t.get("from")), "content": t.get("value")}
            if isinstance(t, Mapping) else t
            for t in turns
        ]  # fmt: skip
    return None


def read_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """Every conversation of a JSON Lines file (OpenAI ``messages`` or ShareGPT
    ``conversations`` records); errors name the file and line."""
    path = Path(path)
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: {err}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{n}: not JSON ({err.msg})") from None
        messages = _messages(record)
        if messages is None:
            raise DataError(f"{path}:{n}: expected a 'messages' or 'conversations' list")
        out.append(check_conversation(messages, f"{path}:{n}"))
    if not out:
        raise DataError(f"{path}: no conversations")
    return out


@dataclass(frozen=True)
class ChatTemplate:
    """Role tokens after ``tokenizer``'s vocabulary: ``<|system|>``, ``<|user|>``,
    ``<|assistant|>`` and ``<|end|>`` are ids ``V .. V + 3`` (``V = tokenizer.vocab_size``);
    the model reads ``vocab_size = V + 4`` ids."""

    tokenizer: Any

    @property
    def base(self) -> int:
        return int(self.tokenizer.vocab_size)

    @property
    def vocab_size(self) -> int:
        return self.base + len(ROLES) + 1

    def role_id(self, role: str) -> int:
        return self.base + ROLES.index(role)

    @property
    def end_id(self) -> int:
        return self.base + len(ROLES)

    def _encode(self, text: str) -> list[int]:
        try:
            return [int(i) for i in self.tokenizer.encode(text)]
        except ValueError as err:  # a character-level tokenizer meeting an unseen character
            raise DataError(f"chat template: {err}") from None

    def render(self, messages: Sequence[Mapping[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, targets)``: the conversation's ids and, per id, whether it is a training
        target (the assistant's content and closing ``<|end|>``)."""
        ids: list[int] = []
        targets: list[bool] = []
        for m in check_conversation(list(messages), ends_with=None):
            content = self._encode(m["content"])
            answer = m["role"] == "assistant"
            ids += [self.role_id(m["role"]), *content, self.end_id]
            targets += [False, *[answer] * len(content), answer]
        return np.array(ids, dtype=np.int64), np.array(targets, dtype=bool)

    def prompt(self, messages: Sequence[Mapping[str, str]]) -> np.ndarray:
        """The ids of a conversation that ends with the user, then ``<|assistant|>``: what a
        model continues to answer (and stops at ``<|end|>``)."""
        check_conversation(list(messages), "prompt", ends_with="user")
        ids, _ = self.render(messages)
        return np.append(ids, self.role_id("assistant"))

    def parse(self, ids: Iterable[int]) -> list[dict[str, str]]:
        """The messages of rendered ids: the inverse of :meth:`render` (for a lossless
        tokenizer). A trailing message without ``<|end|>`` is kept as it stands."""
        out: list[dict[str, str]] = []
        role, content = None, []
        for i in (int(x) for x in ids):
            if self.base <= i < self.end_id:
                if role is not None:
                    raise DataError(f"chat template: <|{ROLES[i - self.base]}|> inside a message")
                role, content = ROLES[i - self.base], []
            elif i == self.end_id:
                if role is None:
                    raise DataError("chat template: <|end|> outside a message")
                out.append({"role": role, "content": self.tokenizer.decode(content)})
                role = None
            elif role is not None:
                content.append(i)
        if role is not None:
            out.append({"role": role, "content": self.tokenizer.decode(content)})
        return out

    def example(self, messages: Sequence[Mapping[str, str]]) -> dict[str, np.ndarray]:
        """One fine-tuning example: ``inputs`` (all ids but the last) and ``targets`` (the next
        id where it is a target, else ``IGNORE``)."""
        ids, targets = self.render(check_conversation(list(messages)))
        labels = np.where(targets, ids, IGNORE)
        return {"inputs": ids[:-1], "targets": labels[1:]}


def pad_rows(examples: Sequence[Mapping[str, np.ndarray]], width: int | None = None) -> dict:
    """One example per row, cut to ``width`` and right-padded to it (default: the longest):
    ``inputs``, ``targets`` (``IGNORE`` on padding) and ``valid``
    (:func:`~functional_llm.data.pad_batch`)."""
    if not examples:
        raise ValueError("pad_rows: no examples")
    cut = [{"inputs": e["inputs"][:width], "targets": e["targets"][:width]} for e in examples]
    # every cut row is at most ``width`` long, so the next multiple of ``width`` is ``width``
    return pad_batch(cut, {"targets": IGNORE}, length_key="inputs", multiple_of=width or 1)


def pack(examples: Sequence[Mapping[str, np.ndarray]], width: int) -> dict:
    """Examples laid end to end into rows of ``width`` tokens, first fit in order: ``inputs``,
    ``targets``, ``valid``, ``positions`` (restarting at 0 for each example) and ``segments``
    (the example's number within its row, from 1; 0 on padding). An example longer than
    ``width`` is cut to it. Give a GPT ``segments`` and ``positions`` so that no token attends
    across examples."""
    if not examples:
        raise ValueError("pack: no examples")
    rows: list[list[Mapping[str, np.ndarray]]] = []
    room: list[int] = []
    for e in examples:
        n = min(len(e["inputs"]), width)
        at = next((r for r, left in enumerate(room) if left >= n), None)
        if at is None:
            rows.append([])
            room.append(width)
            at = len(rows) - 1
        rows[at].append(e)
        room[at] -= n
    shape = (len(rows), width)
    out = {
        "inputs": torch.zeros(shape, dtype=torch.int64),
        "targets": torch.full(shape, IGNORE, dtype=torch.int64),
        "positions": torch.zeros(shape, dtype=torch.int64),
        "segments": torch.zeros(shape, dtype=torch.int64),
    }
    for r, row in enumerate(rows):
        at = 0
        for s, e in enumerate(row, 1):
            n = min(len(e["inputs"]), width)
            out["inputs"][r, at : at + n] = torch.as_tensor(e["inputs"][:n])
            out["targets"][r, at : at + n] = torch.as_tensor(e["targets"][:n])
            out["positions"][r, at : at + n] = torch.arange(n)
            out["segments"][r, at : at + n] = s
            at += n
    out["valid"] = out["segments"] > 0
    return out
