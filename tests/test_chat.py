"""The chat format: the template round-trips and marks exactly the assistant's tokens as targets
(drawn conversations); packing never lets a token see another conversation (a packed row's
logits equal each conversation's alone); readers and validation name what is wrong."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functional_llm as fl
from functional_llm import random
from functional_llm.data import DataError, chat
from functional_llm.types import IGNORE

TEMPLATE = chat.ChatTemplate(fl.data.ByteTokenizer())
text = st.text(min_size=1, max_size=20).filter(str.strip)


@st.composite
def conversations(draw, ends_with: str = "assistant") -> list[dict[str, str]]:
    turns = draw(st.integers(1, 3))
    messages = [{"role": "system", "content": draw(text)}] if draw(st.booleans()) else []
    for _ in range(turns):
        messages += [{"role": "user", "content": draw(text)},
                     {"role": "assistant", "content": draw(text)}]  # fmt: skip
    return messages if ends_with == "assistant" else messages[:-1]


@settings(max_examples=50)
@given(messages=conversations())
def test_the_template_round_trips_and_targets_exactly_the_assistants_tokens(messages) -> None:
    ids, targets = TEMPLATE.render(messages)
    assert TEMPLATE.parse(ids) == messages
    answers = [
        TEMPLATE.tokenizer.encode(m["content"]) for m in messages if m["role"] == "assistant"
    ]
    want = np.concatenate([np.append(a, TEMPLATE.end_id) for a in answers])
    assert np.array_equal(ids[targets], want)  # the answers and their <|end|>, nothing else
    example = TEMPLATE.example(messages)
    assert np.array_equal(example["inputs"], ids[:-1])
    kept = example["targets"] != IGNORE
    assert np.array_equal(example["targets"][kept], want) and np.array_equal(kept, targets[1:])


@settings(max_examples=25)
@given(messages=conversations(ends_with="user"))
def test_a_prompt_ends_by_opening_the_assistants_turn(messages) -> None:
    ids = TEMPLATE.prompt(messages)
    assert ids[-1] == TEMPLATE.role_id("assistant")
    assert TEMPLATE.parse(ids)[:-1] == messages  # and an empty assistant message, still open


def _gpt() -> tuple:
    model = fl.models.GPT(fl.models.GPTConfig(vocab_size=TEMPLATE.vocab_size, max_seq_len=64,
                                              d_model=16, n_layers=2, n_heads=2,
                                              dtype=torch.float64))  # fmt: skip
    return model, model.init(random.key(0))


@settings(max_examples=15)
@given(batch=st.lists(conversations(), min_size=2, max_size=5), width=st.integers(40, 64))
def test_packed_rows_give_each_conversation_its_own_logits(batch, width) -> None:
    model, params = _gpt()
    examples = [TEMPLATE.example(m) for m in batch]
    packed = chat.pack(examples, width)
    logits = model.apply(params, packed["inputs"], valid=packed["valid"],
                         positions=packed["positions"], segments=packed["segments"])  # fmt: skip
    seen = 0
    for row in range(packed["inputs"].shape[0]):
        for s in range(1, int(packed["segments"][row].max()) + 1):
            at = packed["segments"][row] == s
            alone = model.apply(params, packed["inputs"][row][at][None])[0]
            torch.testing.assert_close(logits[row][at], alone, rtol=1e-10, atol=1e-10)
            seen += 1
    assert seen == len(examples)
    assert torch.equal(packed["targets"][~packed["valid"]],
                       torch.full_like(packed["targets"][~packed["valid"]], IGNORE))  # fmt: skip


def test_padded_rows_and_the_loss_on_answers_only() -> None:
    model, params = _gpt()
    ask = {"role": "user", "content": "hi"}
    examples = [
        TEMPLATE.example([ask, {"role": "assistant", "content": a}]) for a in ("yes", "no!")
    ]
    batch = chat.pad_rows(examples)
    loss, _ = fl.losses.next_token(model)(params, batch)
    logits = model.apply(params, batch["inputs"], valid=batch["valid"])
    kept = batch["targets"] != IGNORE
    want = torch.nn.functional.cross_entropy(logits[kept], batch["targets"][kept])
    torch.testing.assert_close(loss, want)
    assert int(kept.sum()) == len("yes") + 1 + len("no!") + 1


def test_readers_and_validation_name_the_problem(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    share = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                               {"from": "gpt", "value": "a"}]}  # fmt: skip
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(share) + "\n")
    assert chat.read_conversations(path)[1][0] == {"role": "system", "content": "s"}
    bad = [
        ({"messages": [{"role": "bot", "content": "q"}]}, r"c\.jsonl:1: message 0 has role 'bot'"),
        ({"messages": [{"role": "user", "content": "q"}]}, "must be the assistant's"),
        ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]},
         r"message 0 \(user\) has no text content"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "needs 'user'"),
        ({"text": "hello"}, "expected a 'messages' or 'conversations' list"),
    ]  # fmt: skip
    for record, match in bad:
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(DataError, match=match):
            chat.read_conversations(path)
    path.write_text("{not json\n")
    with pytest.raises(DataError, match=r"c\.jsonl:1: not JSON"):
        chat.read_conversations(path)
    with pytest.raises(DataError, match=r"<\|end\|> outside a message"):
        TEMPLATE.parse([TEMPLATE.end_id])


def test_resizing_the_vocabulary_keeps_the_old_tokens_logits() -> None:
    for tied in (True, False):
        cfg = fl.models.GPTConfig(vocab_size=256, max_seq_len=16, d_model=16, n_layers=1, n_heads=2)
        model = fl.models.GPT(dataclasses.replace(cfg, tie_embeddings=tied))
        params = model.init(random.key(0))
        bigger, resized = fl.finetune.resize_vocab(model, params, TEMPLATE.vocab_size)
        assert bigger.config.vocab_size == 260 and model.config.vocab_size == 256
        tokens = random.randint(random.key(1), (2, 9), 0, 256)
        torch.testing.assert_close(bigger.apply(resized, tokens)[..., :256],
                                   model.apply(params, tokens))  # fmt: skip
        table = resized["embed"]["table"]
        torch.testing.assert_close(table[256:], table[:256].mean(0).expand(4, -1))
        assert params["embed"]["table"].shape == (256, 16)  # the input is not changed
        back = fl.finetune.resize_vocab(bigger, resized, 256)[1]
        assert torch.equal(back["embed"]["table"], params["embed"]["table"])
