"""experiments/compress on a tiny pretraining run: every variant measured, one table."""

from __future__ import annotations

import json
from pathlib import Path

from experiments import compress as compress_cli
from experiments import pretrain_gpt

TINY = [
    "--n-layer", "2", "--n-head", "4", "--n-embd", "32", "--block-size", "16",
    "--batch-size", "4", "--eval-interval", "5", "--eval-iters", "1", "--max-iters", "10",
    "--ckpt-interval", "10", "--sample-chars", "4", "--warmup-iters", "2", "--no-plot",
]  # fmt: skip


def test_compress_measures_every_variant(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x * 2\n" * 300)
    run = tmp_path / "run"
    pretrain_gpt.main([*TINY, "--data", str(text), "--out-dir", str(run)])
    quick = ["--recovery-steps", "3", "--student-steps", "3", "--eval-batches", "2",
             "--new-tokens", "4", "--repeats", "1"]  # fmt: skip
    table = compress_cli.main([str(run), *quick])
    assert len(table) == 12
    fp32, int8, int4 = table["fp32"], table["int8 (weight-only)"], table["int4 (weight-only, g32)"]
    assert (
        int8["param_bytes"] < fp32["param_bytes"] / 2 and int4["param_bytes"] < int8["param_bytes"]
    )
    assert abs(int8["val_loss"] - fp32["val_loss"]) < 0.05
    assert all(row["tokens_per_s_b1"] > 0 for row in table.values())
    saved = json.loads((run / "compress.json").read_text())
    assert saved.keys() == table.keys()
    assert (run / "compress.md").read_text().startswith("| variant |")
