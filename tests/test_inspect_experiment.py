"""experiments/inspect.py on the checkpoints the other experiments write (a GPT run, a BERT
pretraining run, a fine-tuned classifier): every picture written and readable, attributions
complete, the prediction the model's own, and user errors as one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments import finetune_classify, pretrain_bert, pretrain_gpt, translate
from experiments import inspect as cli_inspect
from functional_llm import interpret

TINY = ["--d-model", "16", "--n-layers", "2", "--n-heads", "2", "--d-ff", "32", "--no-plot",
        "--batch-size", "4"]  # fmt: skip
SENTENCES = ["the cat sat on the mat .", "a dog ran in the park .", "birds sing at dawn ."]


def _pictures_are_real(out: Path, names: list[str]) -> None:
    for name in names:
        raw = (out / name).read_bytes()
        if name.endswith(".png"):
            assert raw.startswith(b"\x89PNG") and len(raw) > 2000, name
        else:
            assert b"<span" in raw, name


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inspect_gpt")
    (root / "text.txt").write_text("to be, or not to be: that is the question.\n" * 40)
    pretrain_gpt.main(["--data", str(root / "text.txt"), "--out-dir", str(root / "out"),
                       "--max-iters", "40", "--n-layer", "2", "--n-embd", "32", "--n-head", "2",
                       "--block-size", "32", "--batch-size", "4", "--no-plot",
                       "--sample-chars", "10", "--eval-iters", "1"])  # fmt: skip
    return root / "out"


def test_a_gpt_run_is_drawn_and_its_prediction_explained(gpt_run: Path, capsys) -> None:
    result = cli_inspect.main([str(gpt_run), "--text", "to be, or not to b", "--layer", "0"])
    out = gpt_run / "inspect"
    _pictures_are_real(out, ["attention.png", "attribution.html", "attribution.png", "lens.png"])
    assert abs(result["delta"]) < 1e-3  # integrated gradients are complete
    subject = cli_inspect.load(gpt_run)
    ids = torch.tensor([list(subject.tok.encode("to be, or not to b"))])
    logits = subject.model.apply(subject.params, ids)
    assert result["prediction"] == cli_inspect._piece(subject.tok, int(logits[0, -1].argmax()))
    assert "prediction:" in capsys.readouterr().out
    with pytest.raises(Exception, match="already holds"):  # nothing earlier is overwritten
        cli_inspect.main([str(gpt_run), "--text", "to be"])
    cli_inspect.main([str(gpt_run), "--text", "to be", "--overwrite", "--target", "e"])
    with pytest.raises(
        ValueError, match="--layer: layer 5 is out of range: the stack has 2 blocks"
    ):
        cli_inspect.main([str(gpt_run), "--text", "to", "--layer", "5", "--out",
                          str(gpt_run / "other")])  # fmt: skip
    with pytest.raises(ValueError, match="--target 'to be' is 5 tokens; give one"):
        cli_inspect.main([str(gpt_run), "--text", "to", "--target", "to be", "--out",
                          str(gpt_run / "other2")])  # fmt: skip


def test_a_classifier_and_a_bert_run_are_drawn(tmp_path: Path) -> None:
    rows = [{"text": s, "label": ["pos", "neg"][i % 2]} for i, s in enumerate(SENTENCES * 4)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = ["--train", str(tmp_path / "d.jsonl"), "--dev", str(tmp_path / "d.jsonl")]
    finetune_classify.main([*TINY, *files, "--backbone", "gpt", "--vocab-size", "60",
                            "--epochs", "1", "--out-dir", str(tmp_path / "clf")])  # fmt: skip
    result = cli_inspect.main([str(tmp_path / "clf"), "--text", "the cat ran", "--target", "neg"])
    _pictures_are_real(tmp_path / "clf" / "inspect", ["attention.png", "attribution.png"])
    assert result["prediction"] in ("pos", "neg") and abs(result["delta"]) < 1e-3
    with pytest.raises(ValueError, match=r"--target 'maybe' is not a label; the labels are"):
        cli_inspect.main([str(tmp_path / "clf"), "--text", "a", "--target", "maybe", "--out",
                          str(tmp_path / "x")])  # fmt: skip

    docs = (" ".join(SENTENCES[i % 3 :] + SENTENCES[: i % 3]) for i in range(24))
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs))
    pretrain_bert.main([*TINY, "--data", str(tmp_path / "corpus.txt"), "--vocab-size", "80",
                        "--max-length", "32", "--max-steps", "3", "--eval-interval", "3",
                        "--eval-batches", "1", "--out-dir", str(tmp_path / "bert")])  # fmt: skip
    result = cli_inspect.main([str(tmp_path / "bert"), "--text", "the cat sat on the [MASK] ."])
    _pictures_are_real(tmp_path / "bert" / "inspect", ["attention.png", "lens.png"])
    assert abs(result["delta"]) < 1e-3


def test_pictures_refuse_labels_that_do_not_fit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="queries: 2 labels for 3 positions"):
        interpret.pictures.attention_heatmaps(torch.ones(1, 3, 3) / 3, ["a", "b"],
                                              path=tmp_path / "a.png")  # fmt: skip
    with pytest.raises(ValueError, match=r"weights must be \(heads, T, S\)"):
        interpret.pictures.attention_heatmaps(torch.ones(3, 3), ["a"] * 3, path=tmp_path / "a.png")
    with pytest.raises(ValueError, match="lens_grid: top_tokens must be 2 rows of 3"):
        interpret.pictures.lens_grid([["a"] * 3], torch.ones(2, 3), ["x"] * 3, tmp_path / "l.png")
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("copy", [True, False])
def test_a_translation_run_is_drawn_with_its_cross_attention(tmp_path: Path, copy: bool) -> None:
    pairs = [("open the file", "die Datei öffnen"), ("close the file", "die Datei schließen"),
             ("open the window", "das Fenster öffnen")] * 4  # fmt: skip
    (tmp_path / "t.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    translate.main(["--d-model", "32", "--layers", "2", "--heads", "2", "--d-ff", "64",
                    "--vocab-size", "300", "--max-steps", "6", "--eval-interval", "6",
                    "--eval-size", "2", "--batch-size", "4", "--no-plot", "--warmup", "2",
                    "--train", str(tmp_path / "t.tsv"), "--dev", str(tmp_path / "t.tsv"),
                    "--out-dir", str(tmp_path / "tr"),
                    "--copy-source" if copy else "--no-copy-source"])  # fmt: skip
    result = cli_inspect.main([str(tmp_path / "tr"), "--text", "open the file", "--layer", "1"])
    drawn = ["attention.png", "attribution.html"] + ([] if copy else ["lens.png"])
    _pictures_are_real(tmp_path / "tr" / "inspect", drawn)
    assert (tmp_path / "tr" / "inspect" / "lens.png").exists() != copy  # no lens of a copy head
    assert abs(result["delta"]) < 1e-2
