"""experiments/chat_sft.py and experiments/chat.py end to end on a tiny pretrained GPT: the
fine-tuned model answers held-out-format questions it was taught, lowers the answer loss, and
chat.py --once streams the answer and stops at the end-of-turn token; bad input is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import chat as cli_chat
from experiments import chat_sft, pretrain_gpt
from functional_llm import checkpoint
from functional_llm.data import DataError

QA = [("What does json.dumps do?", "Serialize obj to a JSON formatted str."),
      ("What does os.getcwd do?", "Return the current working directory."),
      ("What does math.sqrt do?", "Return the square root of x."),
      ("What does len do?", "Return the number of items in a container.")]  # fmt: skip


def _write(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("chat")
    convs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in QA * 10]  # fmt: skip
    data = _write(root / "c.jsonl", convs)
    (root / "text.txt").write_text((root / "c.jsonl").read_text() * 10)
    pretrain_gpt.main(["--data", str(root / "text.txt"), "--out-dir", str(root / "pre"),
                       "--max-iters", "20", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
                       "--block-size", "96", "--batch-size", "4", "--no-plot",
                       "--sample-chars", "10", "--eval-iters", "1"])  # fmt: skip
    result = chat_sft.main(["--pretrained", str(root / "pre"), "--data", data, "--dev", data,
                            "--out-dir", str(root / "sft"), "--max-steps", "120",
                            "--batch-size", "4", "--eval-interval", "60", "--answer-size", "4",
                            "--max-new-tokens", "60", "--lr", "1e-2", "--no-repeat-ngram", "0",
                            "--warmup", "10"])  # fmt: skip
    return root, result


def test_fine_tuning_teaches_the_answers_and_writes_its_outputs(trained) -> None:
    root, result = trained
    for name in ("metrics.jsonl", "curves.png", "samples.txt"):
        assert (root / "sft" / name).stat().st_size > 0, name
    assert result["answer_loss_after"] < 0.5 * result["answer_loss_before"]
    assert result["rougeL"] == pytest.approx(100.0)  # memorised: every answer exact


def test_chat_once_answers_and_stops_at_the_end_of_turn(trained, capsys) -> None:
    root, _ = trained
    for question, answer in QA:
        reply = cli_chat.main([str(root / "sft"), "--once", question, "--no-repeat-ngram", "0"])
        assert reply == answer  # nothing after <|end|>
        assert capsys.readouterr().out.strip() == answer  # streamed as it was produced
    sampled = cli_chat.main([str(root / "sft"), "--once", QA[0][0], "--temperature", "0.5",
                             "--seed", "3"])  # fmt: skip
    assert sampled == cli_chat.main([str(root / "sft"), "--once", QA[0][0], "--temperature",
                                     "0.5", "--seed", "3"])  # a function of the seed  # fmt: skip


def test_bad_input_is_named(trained, tmp_path: Path) -> None:
    root, _ = trained
    bad = _write(tmp_path / "bad.jsonl", [{"messages": [{"role": "robot", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: message 0 has role 'robot'"):
        chat_sft.main(["--pretrained", str(root / "pre"), "--data", bad,
                       "--out-dir", str(tmp_path / "x")])  # fmt: skip
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    order = _write(tmp_path / "order.jsonl", [{"messages": twice}])
    with pytest.raises(DataError, match="message 1 is 'user' where the turn order"):
        chat_sft.main(["--pretrained", str(root / "pre"), "--data", order,
                       "--out-dir", str(tmp_path / "x")])  # fmt: skip
    with pytest.raises(checkpoint.CheckpointError, match="not a chat model"):
        cli_chat.main([str(root / "pre"), "--once", "hi"])
    with pytest.raises(DataError, match=r"--once: message 0 \(user\) has no text content"):
        cli_chat.main([str(root / "sft"), "--once", "  "])
    saved = checkpoint.Checkpointer(root / "sft" / "checkpoints").restore()
    meta = {k: v for k, v in saved.metadata.items() if k != "tokenizer"}
    checkpoint.Checkpointer(tmp_path / "bare" / "checkpoints").save(1, saved.state, meta)
    with pytest.raises(checkpoint.CheckpointError, match="holds no tokenizer"):
        cli_chat.main([str(tmp_path / "bare"), "--once", "hi"])


def test_the_interactive_loop_and_its_commands(trained, capsys, monkeypatch) -> None:
    root, _ = trained
    lines = iter([QA[3][0], "/system", "/reset", QA[2][0], "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    last = cli_chat.main([str(root / "sft"), "--no-repeat-ngram", "0"])
    said = capsys.readouterr().out
    assert f"bot> {QA[3][1]}" in said and last == QA[2][1]
    with pytest.raises(StopIteration):  # /quit returned before reading further
        next(lines)


def test_the_help_desk_holds_out_whole_modules_and_is_well_formed() -> None:
    from experiments import helpdesk
    from functional_llm.data import chat

    train, held = helpdesk.conversations()
    assert len(train) > 1000 and len(held) > 100

    def asked(conv: list[dict]) -> str:  # the dotted name the first question is about
        question = next(m["content"] for m in conv if m["role"] == "user")
        return next(w for w in question.rstrip("?.").split() if "." in w)

    held_names = {asked(c) for c in held}
    assert not held_names & {asked(c) for c in train}  # held-out files' names never trained
    assert len({n.rsplit(".", 1)[0] for n in held_names}) > 10  # from many modules
    for conv in train[:300] + held[:100]:
        assert chat.check_conversation(conv) == conv
