"""The label-budget experiment: its draws, its fresh-weights control, its n-gram baseline
(against scikit-learn's), its statistics, and a tiny sweep end to end with --resume."""

import argparse
import json
import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments import finetune_classify, finetune_common, low_resource, pretrain_bert
from functional_llm import checkpoint, data, runs

WORDS = ["good", "bad", "not", "very", "film", "plot", "fun", "dull", ",", "."]


def draw(n, seed, max_train=None):
    """``--train-sample n --seed seed --max-train max_train`` of 50 examples."""
    args = argparse.Namespace(train_sample=n, max_train=max_train, seed=seed)
    return finetune_common.budget(argparse.ArgumentParser(), args, list(range(50)))


def test_a_label_budget_is_a_seeded_draw_without_repeats():
    assert draw(10, 0) == draw(10, 0)  # the same seed draws the same examples
    assert len(set(draw(10, 0))) == 10 and set(draw(10, 0)) <= set(range(50))
    assert draw(10, 0) != draw(10, 1)
    assert draw(10, 0)[:4] == draw(4, 0)  # budgets of one seed are nested
    assert draw(10, 0, max_train=3) == draw(3, 0)
    assert draw(None, 0) == list(range(50))
    assert draw(10, 3) == finetune_common.draw(list(range(50)), 10, 3)  # the baseline's draw
    with pytest.raises(SystemExit):
        draw(51, 0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6), st.sampled_from("xyz")),
        min_size=2,
        max_size=25,
    ),
    st.lists(st.lists(st.sampled_from([*WORDS, "unseen"]), max_size=6), min_size=1, max_size=8),
    st.sampled_from([1, 2]),
)
def test_naive_bayes_matches_scikit_learn(train, dev, ngrams):
    """Uni+bigram multinomial Naive Bayes picks scikit-learn's class wherever sklearn's best
    class is not tied (unseen n-grams are skipped by both)."""
    text = pytest.importorskip("sklearn.feature_extraction.text")
    nb = pytest.importorskip("sklearn.naive_bayes")
    rows = [{"text": " ".join(w), "label": y} for w, y in train]
    tests = [{"text": " ".join(w), "label": "x"} for w in dev]
    vectorizer = text.CountVectorizer(
        tokenizer=finetune_classify.words, lowercase=False, token_pattern=None,
        ngram_range=(1, ngrams),
    )  # fmt: skip
    x = vectorizer.fit_transform([r["text"] for r in rows])
    model = nb.MultinomialNB(alpha=1.0).fit(x, [r["label"] for r in rows])
    joint = model.predict_joint_log_proba(vectorizer.transform([t["text"] for t in tests]))
    ours = finetune_classify.naive_bayes(rows, tests, ngrams=ngrams)
    for scores, got in zip(joint, ours, strict=True):
        top = sorted(scores, reverse=True)
        if len(top) > 1 and top[0] - top[1] < 1e-9:
            continue  # a tie: either class is right
        assert got == model.classes_[scores.argmax()]


def test_features_are_words_then_word_runs():
    assert finetune_classify.features("Not good, at all", 2) == [
        "not", "good", ",", "at", "all", "not good", "good ,", ", at", "at all",
    ]  # fmt: skip
    assert finetune_classify.features("one", 3) == ["one"]


def test_summary_pairs_the_difference_by_seed():
    results = [
        {"labels": 8, "seed": s, "system": system, "accuracy": acc}
        for s, accs in enumerate([(0.7, 0.6, 0.5), (0.9, 0.6, 0.55), (0.8, 0.7, 0.6)])
        for system, acc in zip(("pretrained", "fresh", "naive bayes"), accs, strict=True)
    ]
    (row,) = low_resource.summary(results, [8])
    assert row["seeds"] == 3
    assert row["pretrained"][0] == pytest.approx(0.8)
    assert row["pretrained"][1] == pytest.approx(statistics.stdev([0.7, 0.9, 0.8]) / math.sqrt(3))
    gains = [0.1, 0.3, 0.1]
    assert row["gain"][0] == pytest.approx(statistics.fmean(gains))
    assert row["gain"][1] == pytest.approx(statistics.stdev(gains) / math.sqrt(3))


TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--d-ff", "32", "--no-plot",
        "--batch-size", "4"]  # fmt: skip
SENTENCES = ["a good film .", "a bad film .", "not good at all .", "very fun plot .",
             "dull , dull plot .", "good fun .", "bad , not fun .",
             "a very dull film ."]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny pretrained backbone and a labelled train/dev split."""
    root = tmp_path_factory.mktemp("low_resource")
    rows = "".join(f"{s}\t{int('good' in s or 'fun' in s)}\n" for s in SENTENCES * 3)
    for name in ("train", "dev"):
        (root / f"{name}.tsv").write_text("sentence\tlabel\n" + rows)
    pretrain_bert.main([*TINY, "--data", str(root / "train.tsv"), "--vocab-size", "60",
                        "--max-length", "16", "--max-steps", "2", "--eval-interval", "2",
                        "--out-dir", str(root / "pre")])  # fmt: skip
    return root


def test_reinit_keeps_the_tokenizer_and_shape_but_not_the_weights(files):
    p = argparse.ArgumentParser()
    finetune_common.add_args(p, "x")
    args = finetune_common.parse(p, ["--pretrained", str(files / "pre"), "--reinit"])
    tok, model, params = finetune_common.backbone(args, lambda: [])
    assert params is None
    assert tok.to_json() == data.load_tokenizer(files / "pre" / "tokenizer.json").to_json()
    saved = checkpoint.metadata(files / "pre" / "bert.safetensors")["config"]
    assert checkpoint.config_to_dict(model.config)["d_model"] == saved["d_model"] == 16
    with pytest.raises(SystemExit):
        finetune_common.parse(p, ["--reinit"])


def test_a_small_sweep_end_to_end_and_resumed(files, monkeypatch, capsys):
    flags = ["--pretrained", str(files / "pre"), "--train", str(files / "train.tsv"),
             "--dev", str(files / "dev.tsv"), "--labels", "4", "8", "--seeds", "2", "--full",
             "--min-steps", "2", "--batch-size", "4", "--full-epochs", "1", "--no-plot",
             "--out-dir", str(files / "sweep")]  # fmt: skip
    rows = low_resource.main(flags)
    lines = (files / "sweep" / "results.jsonl").read_text().splitlines()
    results = [json.loads(x) for x in lines]
    assert len(results) == (2 * 2 + 1) * 3  # budgets x seeds, and the whole split; 3 systems
    assert [r["labels"] for r in rows] == [4, 8, None]
    at4 = [r["accuracy"] for r in results if r["labels"] == 4 and r["system"] == "pretrained"]
    assert rows[0]["pretrained"][0] == pytest.approx(statistics.fmean(at4))
    run = checkpoint.metadata(files / "sweep" / "runs" / "fresh_8_seed1" / "model.safetensors")
    assert run["args"]["train_sample"] == 8 and run["args"]["reinit"] and run["args"]["seed"] == 1
    assert run["args"]["epochs"] == low_resource.epochs_for(8, argparse.Namespace(
        min_steps=2, batch_size=4))  # fmt: skip
    assert "whole training split:" in capsys.readouterr().out

    def must_not_run(*_):
        raise AssertionError("a resumed sweep reran a finished run")

    monkeypatch.setattr(low_resource, "fine_tune", must_not_run)
    assert low_resource.main([*flags, "--resume"]) == rows
    assert (files / "sweep" / "results.jsonl").read_text().splitlines() == lines
    with pytest.raises(runs.RunDirError):
        low_resource.main(flags)  # a fresh run never writes into the finished one
    for bad in (["--seeds", "1"], ["--epochs", "3"], ["--seed=2"], ["--seed", "2"]):
        with pytest.raises(SystemExit):
            low_resource.main([*flags[:-1], str(files / "other"), *bad])
    assert not (files / "other").exists()
    with pytest.raises(data.DataError):
        low_resource.main([*flags[:-1], str(files / "other"), "--labels", "1000"])
    assert not (files / "other").exists()  # refused before the folder was made


def test_cloze_questions_blank_one_word_of_a_sentence_in_their_context_or_not():
    """Each answerable question is a sentence of its context with one word blanked, and that
    word sits at the answer's offset; the others come from another document."""
    from experiments import stdlib_text

    train, dev = stdlib_text.qa_task()
    assert len(train) > 15_000 and len(dev) > 1_500  # a question per sentence of each run
    for part in (train, dev):
        assert 0.45 < sum(e.impossible for e in part) / len(part) < 0.55
        for e in part[:: max(1, len(part) // 300)]:
            before, after = e.question.removeprefix("fill in: ").split("___")
            if e.impossible:
                assert not e.answers
                continue
            (answer,), (at,) = e.answers, e.starts
            assert e.context[at : at + len(answer)] == answer and len(answer) > 3
            assert before + answer + after in e.context
    assert {e.id for e in train}.isdisjoint(e.id for e in dev)


def test_fine_tuning_scores_every_n_epochs_and_the_last(files):
    out = files / "every"
    finetune_classify.main(["--pretrained", str(files / "pre"), "--train", str(files / "train.tsv"),
                            "--dev", str(files / "dev.tsv"), "--epochs", "5", "--eval-every", "2",
                            "--batch-size", "8", "--no-plot", "--out-dir", str(out)])  # fmt: skip
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "epoch" in r] == [2, 4, 5]


def test_a_budget_larger_than_the_split_writes_nothing(files):
    out = files / "too_many"
    with pytest.raises(SystemExit):
        finetune_classify.main(["--pretrained", str(files / "pre"), "--train",
                                str(files / "train.tsv"), "--dev", str(files / "dev.tsv"),
                                "--train-sample", "1000", "--out-dir", str(out)])  # fmt: skip
    assert not out.exists()
