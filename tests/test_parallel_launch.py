"""End to end: experiments.pretrain_gpt under torchrun with a dp=2, pp=2 or dp=2,pp=2 mesh logs
the same losses as the single-process run."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "--max-iters", "6", "--eval-interval", "3", "--eval-iters", "2", "--log-interval", "2",
    "--n-layer", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
    "--no-plot", "--sample-chars", "8", "--threads", "1",
]  # fmt: skip


def ranks(mesh: str) -> int:
    """Processes for a mesh such as ``dp=2,pp=2``: the product of its axis sizes."""
    return math.prod(int(axis.split("=")[1]) for axis in mesh.split(","))


def losses(out: Path) -> list[float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[k] for r in lines for k in ("loss", "val_loss", "full_val_loss") if k in r]


@pytest.mark.skipif(sys.platform != "linux" or not shutil.which("torchrun"), reason="torchrun")
@pytest.mark.slow  # two runs of the experiment, one under torchrun (--full tier)
@pytest.mark.parametrize("mesh", ["dp=2", "pp=2", "dp=2,pp=2"])
def test_torchrun_data_and_pipeline_parallel_match_one_process(tmp_path, mesh):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    module = ["-m", "experiments.pretrain_gpt"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    subprocess.run(
        [sys.executable, *module, "--data", str(text), "--out-dir", str(one), *ARGS],
        check=True, timeout=240, env=env, capture_output=True, cwd=ROOT,
    )  # fmt: skip
    two = tmp_path / "two"
    run = subprocess.run(
        ["torchrun", "--standalone", "--nproc-per-node", str(ranks(mesh)), *module, "--mesh", mesh,
         "--data", str(text), "--out-dir", str(two), *ARGS],
        timeout=240, env=env, capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    want, got = losses(one), losses(two)
    assert len(got) == len(want) > 3
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4, (got, want)
    assert (two / "checkpoints").exists() and (two / "samples.txt").exists()
