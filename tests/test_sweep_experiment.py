"""experiments/sweep: N learning rates trained as one vmapped ensemble on a small corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import sweep
from functional_llm import runs

TINY = ["--members", "3", "--max-iters", "6", "--eval-interval", "3", "--warmup-iters", "2",
        "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "8",
        "--batch-size", "2", "--eval-iters", "1"]  # fmt: skip


def test_a_sweep_trains_every_rate_and_resumes_where_it_ended(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "sweep"
    result = sweep.main([*TINY, "--data", str(text), "--out-dir", str(out)])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r.get("loss", r.get("val_loss"))) == 3 for r in records)
    assert len({round(v, 6) for v in result["val_loss"]}) == 3  # each rate its own run
    assert result["best_val_loss"] == min(result["val_loss"])
    assert (out / "loss.png").exists() and (out / "tokenizer.json").exists()
    again = sweep.main([*TINY, "--data", str(text), "--out-dir", str(out), "--resume"])
    assert again["val_loss"] == result["val_loss"]  # nothing left to train: the same members
    with pytest.raises(runs.RunDirError):
        sweep.main([*TINY, "--data", str(text), "--out-dir", str(out)])


def test_bad_sweep_flags_name_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        sweep.parse_args(["--lr-min", "1e-2", "--lr-max", "1e-3"])
    assert "--lr-min 0.01 is above --lr-max 0.001" in capsys.readouterr().err
