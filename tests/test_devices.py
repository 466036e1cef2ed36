"""``--device`` and ``--dtype`` on the experiments: validated when parsed; the runs on a GPU are
marked ``gpu`` and skipped without one (they run where a GPU is lent), and a GPU run matches
the CPU run of the same seed."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from experiments import cli, pretrain_gpt
from experiments import generate as generate_cli
from tests.test_pretrain_experiment import TINY, corpus

no_cuda = not torch.cuda.is_available()


def test_device_flags_are_validated_when_parsed() -> None:
    assert cli.device_spec("cpu") == "cpu"
    for bad, message in (("tpu", "not a device"), ("meta", "expected cpu, cuda")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            cli.device_spec(bad)
    if no_cuda:
        with pytest.raises(argparse.ArgumentTypeError, match="no CUDA device"):
            cli.device_spec("cuda")
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="CUDA device"):
            cli.device_spec(f"cuda:{torch.cuda.device_count()}")
    args = argparse.Namespace(device=None, dtype="bfloat16")
    assert cli.device(args).type == ("cpu" if no_cuda else "cuda")
    assert cli.dtype(args) == torch.bfloat16


def test_a_mesh_places_tensors_itself(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        pretrain_gpt.parse_args(["--mesh", "dp=2", "--device", "cpu"])
    assert "--device: under --mesh the mesh places every tensor" in capsys.readouterr().err


def test_dtype_sets_the_params_dtype(tmp_path: Path) -> None:
    text = corpus(tmp_path)
    out = tmp_path / "bf16"
    pretrain_gpt.main([*TINY, "--data", text, "--max-iters", "3", "--out-dir", str(out),
                       "--device", "cpu", "--dtype", "bfloat16", "--no-plot"])  # fmt: skip
    model, params, _ = generate_cli.load(out)
    assert model.config.dtype == torch.bfloat16
    assert params["embed"]["table"].dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(no_cuda, reason="needs a CUDA device")
def test_a_gpu_run_matches_the_cpu_run(tmp_path: Path) -> None:
    text = corpus(tmp_path)
    results = {}
    for device in ("cpu", "cuda"):
        results[device] = pretrain_gpt.main([
            *TINY, "--data", text, "--max-iters", "6", "--out-dir", str(tmp_path / device),
            "--device", device, "--no-plot",
        ])  # fmt: skip
    assert results["cuda"]["val_loss"] == pytest.approx(results["cpu"]["val_loss"], rel=1e-3)
    generated = generate_cli.main([str(tmp_path / "cuda"), "--prompt", "a", "--device", "cuda",
                                   "--max-new-tokens", "4"])  # fmt: skip
    assert generated["tokens"] == 4
