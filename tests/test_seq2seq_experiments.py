"""The translation and summarisation experiments end to end on tiny models and files the tests
write: outputs, scores and baselines, the trained model reused, resume, and bad input."""

import json

import pytest
import torch

import functional_llm as fl
from experiments import cli, summarize, translate
from experiments import seq2seq_task as task
from functional_llm import checkpoint

TINY = ["--d-model", "32", "--layers", "1", "--heads", "2", "--d-ff", "64", "--vocab-size", "300",
        "--max-steps", "6", "--eval-interval", "3", "--ckpt-interval", "3", "--eval-size", "4",
        "--num-beams", "2", "--batch-size", "4", "--no-plot", "--warmup", "2"]  # fmt: skip
PAIRS = [
    ("open the file", "die Datei öffnen"), ("close the file", "die Datei schließen"),
    ("open the window", "das Fenster öffnen"), ("close the window", "das Fenster schließen"),
    ("save the file", "die Datei speichern"), ("print the file", "die Datei drucken"),
]  # fmt: skip


def write_tsv(path, pairs):
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    return str(path)


def test_translation_trains_scores_against_its_baselines_and_translates(tmp_path, capsys):
    train, dev = write_tsv(tmp_path / "t.tsv", PAIRS * 3), write_tsv(tmp_path / "d.tsv", PAIRS[:4])
    out = tmp_path / "out"
    result = translate.main([*TINY, "--train", train, "--dev", dev, "--out-dir", str(out)])
    said = capsys.readouterr().out
    assert {"greedy", "beam 2", "baseline: copy the source",
            "baseline: word-by-word dictionary"} <= set(result)  # fmt: skip
    assert "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp" in said
    for name in ("metrics.jsonl", "samples.txt", "tokenizer.json"):
        assert (out / name).exists(), name
    assert checkpoint.Checkpointer(out / "checkpoints").steps() == [3, 6]
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["final"] and final["greedy"]["bleu"] == result["greedy"]
    translate.main([*TINY, "--out-dir", str(out), "--translate", "open the file"])
    assert capsys.readouterr().out.startswith("open the file\n  -> ")


def test_checkpoint_averaging_takes_the_mean_of_the_newest_checkpoints(tmp_path):
    out = tmp_path / "out"
    pairs = write_tsv(tmp_path / "t.tsv", PAIRS)
    translate.main([*TINY, "--train", pairs, "--dev", pairs, "--out-dir", str(out),
                    "--max-steps", "9", "--average", "2"])  # fmt: skip
    ckpts = checkpoint.Checkpointer(out / "checkpoints")
    assert ckpts.steps() == [6, 9]  # --average 2 keeps (at least) two
    model, last, _ = task.trained(ckpts.restore(), "the run")
    before = cli.trained_params(model, ckpts.load(step=6))
    mean = fl.tree.map(lambda a, b: (a + b) / 2, before, last)
    torch.testing.assert_close(task.averaged(ckpts, model, 2, last, 9), mean)
    torch.testing.assert_close(task.averaged(ckpts, model, 5, last, 9), mean)  # all there are
    torch.testing.assert_close(task.averaged(ckpts, model, 1, last, 9), last)


def test_a_tiny_translator_memorises_its_pairs(tmp_path):
    """The experiment's own loop (collator, shift, loss, optimizer, greedy and beam decoding)
    fits six pairs exactly: every greedy and beam output equals its reference."""
    pairs = write_tsv(tmp_path / "t.tsv", PAIRS * 4)
    out = tmp_path / "out"
    translate.main(["--train", pairs, "--dev", write_tsv(tmp_path / "d.tsv", PAIRS),
                             "--d-model", "64", "--layers", "1", "--heads", "2", "--d-ff", "128",
                             "--vocab-size", "300", "--max-steps", "150", "--warmup", "10",
                             "--lr", "3e-3", "--batch-size", "8", "--label-smoothing", "0",
                             "--eval-size", "6", "--num-beams", "2", "--no-plot",
                             "--out-dir", str(out)])  # fmt: skip
    samples = (out / "samples.txt").read_text(encoding="utf-8").split("\n\n")
    blocks = [dict(line.split(":", 1) for line in block.splitlines()) for block in samples]
    assert len(blocks) == len(PAIRS)
    for block in blocks:
        reference = block["reference"].strip()
        assert block["greedy"].strip() == reference and block["beam"].strip() == reference
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["greedy"]["chrf"] == final["beam 2"]["chrf"] == 100.0


def test_the_dictionary_baseline_learns_word_for_word():
    (guessed,) = translate.dictionary(PAIRS * 2, [("open the window", "")])
    words = guessed.split()  # "the" ties between "Datei" and "die": the first sorted wins
    assert words[0] == "öffnen" and words[-1] == "Fenster" and len(words) == 3


def test_summarisation_baselines():
    held = [("def getItemCount(self):\n    return 1", ""), ("async def load_all_rows(x):", "")]
    assert summarize.name_words([], held) == ["get item count", "load all rows"]
    assert summarize.first_line([], held) == [
        "def getItemCount(self):",
        "async def load_all_rows(x):",
    ]


def test_bad_input_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        translate.main(["--train", "x.tsv", "--out-dir", str(tmp_path / "a")])
    assert "--train and --dev go together" in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    bad.write_text("only one column\n", encoding="utf-8")
    from functional_llm.data import DataError

    with pytest.raises(DataError, match=r"bad.tsv:1: expected 'source<TAB>target'"):
        translate.main([*TINY, "--train", str(bad), "--dev", str(bad),
                        "--out-dir", str(tmp_path / "b")])  # fmt: skip
    assert not any((tmp_path / "b").iterdir())  # nothing written half-way
    with pytest.raises(
        checkpoint.CheckpointError, match=r"no checkpoint in .*; train a model there first"
    ):
        summarize.main(["--out-dir", str(tmp_path / "c"), "--summarize", __file__])
