"""The pretraining and fine-tuning experiments end to end, on tiny models and small files the
tests write: outputs written, --resume exact, a pretrained backbone reused, LoRA runs saving
only adapters and the head."""

import importlib
import json
import signal
import time

import pytest

import functional_llm as fl
from functional_llm import checkpoint
from functional_llm.testing import assert_trees_equal
from tests.processes import command

TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--d-ff", "32", "--no-plot",
        "--batch-size", "4"]  # fmt: skip


def load(name):
    return importlib.import_module(f"experiments.{name}")


def assert_rebuildable(model_file, head, pretrained_dir, **fields):
    """The saved fine-tuned model records what rebuilds it: the pretrained run's tokenizer,
    the backbone's config and the task's fields; its params load into the rebuilt head."""
    meta = checkpoint.metadata(model_file)
    assert meta["tokenizer"] == json.loads((pretrained_dir / "tokenizer.json").read_text())
    assert {k: meta[k] for k in fields} == fields
    backbone = fl.models.BERT(checkpoint.config_from_dict(fl.models.BERTConfig, meta["config"]))
    labels = {"num_labels": len(meta["labels"])} if "labels" in meta else {}
    checkpoint.load(model_file, like=head(backbone, **labels).shapes())


SENTENCES = [
    "The cat sat on the mat.", "A dog ran in the park.", "Birds sing in the morning.",
    "The sun rose over the hills.", "Rain fell on the old roof.", "She read a long book.",
]  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny BERT pretrained for 6 steps, and the same run stopped at 3 and resumed."""
    root = tmp_path_factory.mktemp("pretrain")
    docs = "\n\n".join(" ".join(SENTENCES[i % 6 :] + SENTENCES[: i % 6]) for i in range(24))
    (root / "corpus.txt").write_text(docs)
    common = [*TINY, "--data", str(root / "corpus.txt"), "--vocab-size", "120",
              "--max-length", "32", "--eval-interval", "3", "--eval-batches", "2",
              "--ckpt-interval", "3", "--warmup", "2", "--decay-steps", "6"]  # fmt: skip
    script = load("pretrain_bert")
    script.main([*common, "--max-steps", "3", "--out-dir", str(root / "split")])
    script.main([*common, "--max-steps", "6", "--out-dir", str(root / "split"), "--resume"])
    # The same tokenizer: WordPiece training differs between processes (tokenizers#1794).
    whole = script.main([*common, "--max-steps", "6", "--out-dir", str(root / "whole"),
                         "--tokenizer", str(root / "split" / "tokenizer.json")])  # fmt: skip
    return root, whole


def test_pretraining_writes_its_outputs_and_resumes_exactly(pretrained):
    root, result = pretrained
    for name in ("tokenizer.json", "bert.safetensors", "metrics.jsonl", "checkpoints"):
        assert (root / "whole" / name).exists(), name
    assert 0.0 <= result["val_nsp_accuracy"] <= 1.0 and result["val_perplexity"] > 1.0
    records = [json.loads(x) for x in (root / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_mlm_loss" in r] == [0, 3, 6]
    split = [json.loads(x) for x in (root / "split" / "metrics.jsonl").read_text().splitlines()]
    assert split == records  # the resumed run's history: kept, appended, nothing duplicated
    assert_trees_equal(
        checkpoint.load(root / "split" / "bert.safetensors"),
        checkpoint.load(root / "whole" / "bert.safetensors"),
    )


def test_pretraining_on_one_sentence_rows_trains_mlm_only(tmp_path):
    rows = "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(SENTENCES * 4))
    (tmp_path / "rows.tsv").write_text("sentence\tlabel\n" + rows)
    result = load("pretrain_bert").main(
        [*TINY, "--data", str(tmp_path / "rows.tsv"), "--vocab-size", "100", "--max-length", "16",
         "--max-steps", "2", "--eval-interval", "2", "--out-dir", str(tmp_path / "o")]
    )  # fmt: skip
    assert "val_nsp_accuracy" not in result and result["val_perplexity"] > 1.0


def test_classification_from_pretrained_beside_naive_bayes(pretrained, tmp_path):
    root, _ = pretrained
    rows = [(s, i % 2) for i, s in enumerate(SENTENCES * 4)]
    for name in ("train", "dev"):
        (tmp_path / f"{name}.tsv").write_text(
            "sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows)
        )
    args = [*TINY, "--train", str(tmp_path / "train.tsv"), "--dev", str(tmp_path / "dev.tsv"),
            "--pretrained", str(root / "whole"), "--epochs", "1"]  # fmt: skip
    result = load("finetune_classify").main([*args, "--out-dir", str(tmp_path / "full")])
    assert {"accuracy", "macro_f1", "nb_accuracy", "nb_macro_f1"} <= set(result)
    assert result["nb_accuracy"] == 1.0  # the same sentences: Naive Bayes memorises them
    lora = load("finetune_classify").main(
        [*args, "--lora-rank", "2", "--out-dir", str(tmp_path / "lora")]
    )
    assert 0.0 <= lora["accuracy"] <= 1.0
    saved = checkpoint.load(tmp_path / "lora" / "model.safetensors")
    assert set(saved) == {"adapters", "head"}


def test_interrupted_finetuning_resumes_to_the_uninterrupted_model(pretrained, tmp_path):
    """Fine-tuning stopped by SIGINT mid-epoch saves its train state; ``--resume`` continues
    it (the epoch's remaining batches, the same keys) to the model an uninterrupted run makes,
    bit for bit, and the metrics log reads as one run's."""
    root, _ = pretrained
    rows = "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(SENTENCES * 100))
    (tmp_path / "d.tsv").write_text("sentence\tlabel\n" + rows)
    args = [*TINY, "--train", str(tmp_path / "d.tsv"), "--dev", str(tmp_path / "d.tsv"),
            "--pretrained", str(root / "whole"), "--epochs", "2", "--batch-size", "2",
            "--eval-every", "1"]  # fmt: skip
    whole, split = tmp_path / "whole", tmp_path / "split"
    load("finetune_classify").main([*args, "--out-dir", str(whole)])  # 2 x 300 steps
    proc = command("experiments.finetune_classify", *args, "--out-dir", str(split))
    log, deadline = split / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and not (log.exists() and '"loss"' in log.read_text()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    said, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = said.strip().splitlines()[-1]
    assert "continue with --resume" in last, last
    stopped = int(last.split("after step ")[1].split(":")[0])
    assert 10 <= stopped < 600, last  # stopped within the run, not at its end
    load("finetune_classify").main([*args, "--out-dir", str(split), "--resume"])
    assert_trees_equal(
        checkpoint.load(split / "model.safetensors"), checkpoint.load(whole / "model.safetensors")
    )
    lines = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    drop = lambda r: {k: v for k, v in r.items() if k != "train_s"}  # noqa: E731
    assert [drop(r) for r in lines(split)] == [drop(r) for r in lines(whole)]


def test_gpt_classifier_from_scratch(tmp_path):
    rows = [{"text": s, "label": ["a", "b"][i % 2]} for i, s in enumerate(SENTENCES * 2)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with_plot = [a for a in TINY if a != "--no-plot"]
    result = load("finetune_classify").main(
        [*with_plot, "--backbone", "gpt", "--vocab-size", "100", "--epochs", "1",
         "--train", str(tmp_path / "d.jsonl"), "--dev", str(tmp_path / "d.jsonl"),
         "--out-dir", str(tmp_path / "o")]
    )  # fmt: skip
    assert 0.0 <= result["accuracy"] <= 1.0
    assert (tmp_path / "o" / "curves.png").stat().st_size > 0
    # the fresh tokenizer is saved, and a finished run resumed reads it back and rescores
    saved = json.loads((tmp_path / "o" / "tokenizer.json").read_text())
    assert checkpoint.metadata(tmp_path / "o" / "model.safetensors")["tokenizer"] == saved
    again = load("finetune_classify").main(
        [*TINY, "--backbone", "gpt", "--vocab-size", "100", "--epochs", "1", "--resume",
         "--train", str(tmp_path / "d.jsonl"), "--dev", str(tmp_path / "d.jsonl"),
         "--out-dir", str(tmp_path / "o")]
    )  # fmt: skip
    assert again["accuracy"] == result["accuracy"]


def test_tagging_on_conll(pretrained, tmp_path):
    root, _ = pretrained
    conll = "-DOCSTART- O\n\n" + "The O\ncat B-ANIMAL\nsat O\n\nA O\nbig B-ANIMAL\ndog I-ANIMAL\n\n"
    (tmp_path / "t.conll").write_text(conll * 4)
    result = load("finetune_tagging").main(
        [*TINY, "--train", str(tmp_path / "t.conll"), "--dev", str(tmp_path / "t.conll"),
         "--pretrained", str(root / "whole"), "--epochs", "2", "--scheme", "bioes",
         "--freeze", "backbone.embed.*", "--layer-decay", "0.8",
         "--out-dir", str(tmp_path / "o")]
    )  # fmt: skip
    assert {"precision", "recall", "f1", "word_accuracy"} <= set(result)
    tags = ["B-ANIMAL", "E-ANIMAL", "O", "S-ANIMAL"]  # BIOES, sorted
    assert_rebuildable(tmp_path / "o" / "model.safetensors", fl.models.TokenClassifier,
                       root / "whole", task="tag", labels=tags)  # fmt: skip


def test_tagging_names_tags_outside_bio_before_training(tmp_path, capsys):
    (tmp_path / "t.conll").write_text("The O\ncat B-ANIMAL\nsat X\n\n")
    conll = str(tmp_path / "t.conll")
    with pytest.raises(SystemExit):
        load("finetune_tagging").main(["--train", conll, "--dev", conll, "--out-dir",
                                       str(tmp_path / "o")])  # fmt: skip
    assert "tags ['X'] are not BIO/BIOES" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written


def test_qa_on_squad_with_held_out_articles(pretrained, tmp_path):
    root, _ = pretrained
    articles = []
    for a, sentence in enumerate(SENTENCES):
        context = sentence + " " + " ".join(SENTENCES)
        word = sentence.split()[1]
        qas = [
            {"id": f"{a}-1", "question": f"What is {word}?", "is_impossible": False,
             "answers": [{"text": word, "answer_start": context.index(word)}]},
            {"id": f"{a}-2", "question": "Who?", "is_impossible": True, "answers": []},
        ]  # fmt: skip
        articles.append({"title": str(a), "paragraphs": [{"context": context, "qas": qas}]})
    (tmp_path / "s.json").write_text(json.dumps({"version": "v2.0", "data": articles}))
    result = load("finetune_qa").main(
        [*TINY, "--train", str(tmp_path / "s.json"), "--holdout-every", "3", "--epochs", "1",
         "--pretrained", str(root / "whole"), "--doc-stride", "8", "--max-query", "8",
         "--out-dir", str(tmp_path / "o")]
    )  # fmt: skip
    assert result["no_answer_exact"] == 50.0  # half the held-out questions are unanswerable
    assert 0.0 <= result["exact"] <= 100.0 and 0.0 <= result["f1"] <= 100.0
    assert_rebuildable(tmp_path / "o" / "model.safetensors", fl.models.ExtractiveQA,
                       root / "whole", task="qa")  # fmt: skip
