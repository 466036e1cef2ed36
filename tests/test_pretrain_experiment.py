"""The main job end to end on a tiny config: outputs written, and --resume continuing a run
lands bitwise on the same state as the run that never stopped."""

import importlib
import json
import re

import pytest

from experiments import stdlib_text
from functional_llm import checkpoint
from functional_llm.testing import assert_trees_close, assert_trees_equal


@pytest.fixture(scope="module")
def script():
    return importlib.import_module("experiments.pretrain_gpt")


TINY = [
    "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8",
    "--batch-size", "2", "--eval-interval", "3", "--eval-iters", "1", "--log-interval", "1",
    "--ckpt-interval", "3", "--sample-chars", "5", "--warmup-iters", "2", "--lr-decay-iters", "6",
]  # fmt: skip


def corpus(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("to be, or not to be: that is the question.\n" * 40, encoding="utf-8")
    return str(path)


def test_training_writes_every_output(script, tmp_path):
    out = tmp_path / "run"
    result = script.main([*TINY, "--data", corpus(tmp_path), "--max-iters", "6",
                          "--out-dir", str(out)])  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3, 6]
    assert {"grad_norm", "learning_rate", "tokens", "accuracy"} <= set(records[1])
    assert (out / "loss.png").stat().st_size > 0
    assert len((out / "samples.txt").read_text()) >= 5
    assert checkpoint.Checkpointer(out / "checkpoints").steps() == [3, 6]
    assert result["full_val_loss"] > 0


def test_resume_continues_bitwise(script, tmp_path):
    text = corpus(tmp_path)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    script.main([*TINY, "--data", text, "--max-iters", "6", "--out-dir", str(straight)])
    script.main([*TINY, "--data", text, "--max-iters", "3", "--out-dir", str(resumed)])
    script.main([*TINY, "--data", text, "--max-iters", "6", "--out-dir", str(resumed),
                 "--resume"])  # fmt: skip
    a = checkpoint.Checkpointer(straight / "checkpoints").load()
    b = checkpoint.Checkpointer(resumed / "checkpoints").load()
    assert_trees_equal(b, a)
    records = lambda run: [  # noqa: E731
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    # The resumed run's metrics are the uninterrupted run's, record for record: the first part
    # kept (not truncated), the records after the checkpoint not duplicated.
    assert records(resumed) == records(straight)


def test_default_corpus_samples_the_whole_standard_library(script):
    text = stdlib_text.stdlib_corpus(1.0)
    files = re.findall(r"^# (\S+\.py)$", text, flags=re.M)
    assert len(text) >= 0.5e6 and "def " in text and len(files) >= 30
    assert min(files) < "c" and max(files) > "t"  # from all over the alphabet of modules
    held_out = files[len(files) - len(files) // 10 :]  # every tenth file comes last
    assert held_out == sorted(held_out) and min(held_out) < "m" < max(held_out)


def test_donated_run_follows_the_pure_run(script, tmp_path):
    text = corpus(tmp_path)
    pure, donated = tmp_path / "pure", tmp_path / "donated"
    script.main([*TINY, "--data", text, "--max-iters", "6", "--out-dir", str(pure),
                 "--no-donate"])  # fmt: skip
    script.main([*TINY, "--data", text, "--max-iters", "6", "--out-dir", str(donated)])
    a = checkpoint.Checkpointer(pure / "checkpoints").load()["state"][0]
    b = checkpoint.Checkpointer(donated / "checkpoints").load()["state"][0]
    assert_trees_close(b, a, rtol=1e-5, atol=1e-6)  # fused kernel vs foreach: rounding only
    assert script.parse_args([]).donate and not script.parse_args(["--no-donate"]).donate
    for flags in (["--compile"], ["--skip-nonfinite"]):
        assert not script.parse_args(flags).donate, flags


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--mesh", "pp=2", "--compile"], "--compile"),
        (["--mesh", "pp=2", "--dropout", "0.1", "--resume"], "--resume, --dropout"),
        (["--mesh", "pp=2,tp=2"], "pp and dp axes only"),
        (["--mesh", "pp=2", "--batch-size", "3", "--microbatches", "2"], "--microbatches 2"),
    ],
)
def test_a_pipeline_mesh_names_what_it_cannot_run_with(script, capsys, flags, named):
    with pytest.raises(SystemExit):
        script.parse_args(flags)
    error = capsys.readouterr().err.strip().splitlines()[-1]  # one line, naming the flag
    assert named in error and "pp" in error
