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


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux ``/proc``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(sys.platform != "linux" or not shutil.which("torchrun"), reason="torchrun")
@pytest.mark.slow  # a torchrun job stopped and resumed (--full tier)
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step_and_saves(tmp_path):
    import signal
    import time

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "out"
    flags = ["-m", "experiments.pretrain_gpt", "--mesh", "dp=2", "--data", str(text),
             "--out-dir", str(out), "--eval-interval", "100000", "--log-interval", "5",
             "--ckpt-interval", "100000", "--n-layer", "1", "--n-embd", "16", "--block-size", "8",
             "--batch-size", "4", "--no-plot", "--threads", "1", "--sample-chars", "4"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = ["torchrun", "--standalone", "--nproc-per-node", "2"]
    job = subprocess.Popen([*launch, *flags, "--max-iters", "100000"], env=env, cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 180
    metrics = out / "metrics.jsonl"
    logged = lambda: metrics.exists() and metrics.read_text().count("\n") > 20  # noqa: E731
    while time.time() < deadline and not logged():
        time.sleep(0.2)
    workers = children(job.pid)
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGTERM)  # one rank only, as a preemption might
    said, err = job.communicate(timeout=120)
    assert "stopped by a signal to another rank after step " in said, err[-3000:]
    step = int(said.split("after step ")[1].split(":")[0])
    assert step % 5 == 0  # at a log point, where the ranks agree
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{step:08d}.safetensors"]
    again = [*launch, *flags, "--max-iters", str(step + 5), "--resume"]
    resumed = subprocess.run(again, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {step})" in resumed.stdout


@pytest.mark.skipif(sys.platform != "linux" or not shutil.which("torchrun"), reason="torchrun")
@pytest.mark.slow  # four processes under torchrun (--full tier)
def test_the_readme_torchrun_script_prints_once_the_loss_of_one_process(tmp_path):
    """The README's ``torchrun --nproc-per-node 4`` script (dp=2 with FSDP, tp=2) runs as
    written, prints its table and loss once, and its loss is the one-process step's."""
    import re

    from functional_llm import losses, models, optim, random, train

    readme = (ROOT / "README.md").read_text()
    script = re.search(r"A script for `torchrun.*?```py\n(.*?)```", readme, flags=re.S)
    assert script is not None
    (tmp_path / "script.py").write_text(script.group(1))
    run = subprocess.run(
        ["torchrun", "--standalone", "--nproc-per-node", "4", str(tmp_path / "script.py")],
        timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    printed = re.findall(r"^loss (\S+)$", run.stdout, flags=re.M)
    assert len(printed) == 1 and run.stdout.count("placements") == 1, run.stdout

    model = models.GPT(models.GPTConfig(vocab_size=64, max_seq_len=64, d_model=128, n_heads=4))
    opt = optim.adamw(1e-3)
    state = train.init_state(model.init(random.key(0)), opt, random.key(1))
    batch = {"tokens": random.randint(random.key(2), (8, 65), 0, 64)}
    _, metrics = train.make_step(losses.next_token(model), opt)(state, batch)
    assert abs(float(printed[0]) - float(metrics["loss"])) < 1e-5
