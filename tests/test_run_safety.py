"""Never lose a run: each test reproduces a way a run used to lose or corrupt what it saved
(a second run into the same folder, divergence, a resume, an interrupt, a damaged or edited
file) and shows what happens now."""

import json
import math
import os
import signal
import time

import pytest
import torch

from experiments import cli, pretrain_gpt
from functional_llm import checkpoint, files, optim, random, runs, train
from functional_llm.testing import assert_trees_equal
from tests.processes import command

TINY = [
    "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8",
    "--batch-size", "2", "--eval-interval", "3", "--eval-iters", "1", "--log-interval", "1",
    "--ckpt-interval", "3", "--sample-chars", "5", "--warmup-iters", "2", "--no-plot",
]  # fmt: skip


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("to be, or not to be: that is the question.\n" * 40, encoding="utf-8")
    return str(path)


def gpt(text, out, *flags):
    return pretrain_gpt.main([*TINY, "--data", text, "--out-dir", str(out), *flags])


def strict_records(path):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_a_fresh_run_into_a_used_folder_is_refused_and_the_old_run_survives(text, tmp_path):
    out = tmp_path / "A"
    gpt(text, out, "--max-iters", "12")
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    metrics = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(runs.RunDirError, match=r"already holds a run .* --resume .* --overwrite"):
        gpt(text, out, "--max-iters", "6")
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before
    assert (out / "metrics.jsonl").read_bytes() == metrics
    (out / "notes.txt").write_text("mine")
    gpt(text, out, "--max-iters", "6", "--overwrite")
    assert checkpoint.Checkpointer(out / "checkpoints").steps() == [3, 6]
    assert (out / "notes.txt").read_text() == "mine"  # not one of the run's outputs: kept


def test_divergence_stops_the_run_naming_the_step_and_saves_nothing_non_finite(text, tmp_path):
    out = tmp_path / "diverged"
    with pytest.raises(cli.Diverged, match=r"non-finite at step \d+"):
        gpt(text, out, "--max-iters", "12", "--lr", "1e6")
    for step in checkpoint.Checkpointer(out / "checkpoints").steps():
        assert checkpoint.metadata(out / "checkpoints" / f"step_{step:08d}.safetensors")["finite"]
    strict_records(out / "metrics.jsonl")  # strict JSON, whatever was logged


def test_skip_nonfinite_finishes_with_a_finite_state(text, tmp_path):
    out = tmp_path / "skipped"
    gpt(text, out, "--max-iters", "6", "--lr", "1e6", "--skip-nonfinite")
    state = checkpoint.Checkpointer(out / "checkpoints").load()["state"]
    assert all(bool(x.isfinite().all()) for x in torch.utils._pytree.tree_leaves(state)
               if isinstance(x, torch.Tensor) and x.is_floating_point())  # fmt: skip
    records = strict_records(out / "metrics.jsonl")
    assert sum(r.get("skipped", 0) for r in records) >= 1


def test_resume_with_nothing_to_resume_says_so_or_refuses(text, tmp_path, capsys):
    gpt(text, tmp_path / "empty", "--max-iters", "3", "--resume")
    assert "--resume: no checkpoint in" in capsys.readouterr().out
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(runs.RunDirError, match="no checkpoint to resume; pass --overwrite"):
        gpt(text, used, "--max-iters", "3", "--resume")
    assert (used / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_resume_falls_back_past_a_corrupt_newest_checkpoint(text, tmp_path, capsys):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    gpt(text, straight, "--max-iters", "9")
    gpt(text, broken, "--max-iters", "6")
    newest = broken / "checkpoints" / "step_00000006.safetensors"
    data = bytearray(newest.read_bytes())
    data[-3] ^= 0xFF
    newest.write_bytes(data)
    gpt(text, broken, "--max-iters", "9", "--resume")
    said = capsys.readouterr().out
    assert "passed over step_00000006.safetensors: " in said and "checksum mismatch" in said
    assert "resuming from" in said and "(step 3)" in said
    a = checkpoint.Checkpointer(straight / "checkpoints").load()
    b = checkpoint.Checkpointer(broken / "checkpoints").load()
    assert_trees_equal(b, a)
    assert strict_records(broken / "metrics.jsonl") == strict_records(straight / "metrics.jsonl")


def test_an_edited_tokenizer_file_is_refused_on_resume(text, tmp_path):
    out = tmp_path / "run"
    gpt(text, out, "--max-iters", "3")
    saved = json.loads((out / "tokenizer.json").read_text())
    saved["chars"] = saved["chars"][::-1]  # the same characters, another order
    (out / "tokenizer.json").write_text(json.dumps(saved))
    with pytest.raises(runs.RunDirError, match="differs from the tokenizer the checkpoint"):
        gpt(text, out, "--max-iters", "6", "--resume")
    (out / "tokenizer.json").unlink()  # removed: written again from the checkpoint
    gpt(text, out, "--max-iters", "6", "--resume")
    assert json.loads((out / "tokenizer.json").read_text())["chars"] == saved["chars"][::-1]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--batch-size", "0"], "--batch-size: 0 must be > 0"),
        (["--lr", "-1"], "--lr: -1 must be > 0"),
        (["--eval-interval", "0"], "--eval-interval: 0 must be > 0"),
        (["--max-iters", "-3"], "--max-iters: -3 must be > 0"),
        (["--mesh", "dp2"], "--mesh: 'dp2': expected axis=size pairs"),
        (["--dropout", "1.5"], "--dropout: 1.5 must be >= 0.0 and < 1.0"),
        (["--seed", "1.5"], "--seed: '1.5' is not a int"),
        (["--n-embd", "30"], "GPTConfig.n_heads (4) must divide GPTConfig.d_model (30)"),
        (["--mesh", "dp=2"], "--mesh dp=2 runs under torchrun"),
    ],
)
def test_bad_flags_are_one_line_errors_at_parse_time(flags, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        pretrain_gpt.parse_args(flags)
    assert exit_.value.code == 2 and named in capsys.readouterr().err


@pytest.mark.parametrize(
    ("script", "flags", "named"),
    [
        ("pretrain_bert", ["--max-length", "3"], "--max-length 3 leaves no room"),
        ("finetune_qa", ["--train", "x.json", "--holdout-every", "1"], "--holdout-every 1"),
        ("finetune_qa", ["--doc-stride", "0"], "--doc-stride: 0 must be > 0"),
        ("finetune_classify", ["--epochs", "0"], "--epochs: 0 must be > 0"),
        ("finetune_classify", ["--batch-size", "0"], "--batch-size: 0 must be > 0"),
        ("finetune_tagging", ["--d-model", "30"], "BERTConfig.n_heads (4) must divide"),
        ("pretrain_bert", ["--n-heads", "3"], "must divide BERTConfig.d_model (128)"),
    ],
)
def test_other_experiments_refuse_bad_flags(script, flags, named, capsys, tmp_path):
    module = __import__(f"experiments.{script}", fromlist=["main"])
    with pytest.raises(SystemExit) as exit_:
        module.main([*flags, "--out-dir", str(tmp_path / "never")])
    assert exit_.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_user_errors_are_one_line_without_a_traceback(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    for name, message in (("empty.txt", "the file is empty"), ("latin1.txt", "not UTF-8")):
        proc = command("experiments.pretrain_gpt", "--data", str(tmp_path / name),
                       "--out-dir", str(tmp_path / f"{name}.out"))  # fmt: skip
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / name}:"), err
        assert message in err


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_finishes_the_step_saves_and_resumes(text, tmp_path, sig, code):
    out = tmp_path / "run"
    args = [*TINY, "--data", text, "--out-dir", str(out), "--ckpt-interval", "100000"]
    proc = command("experiments.pretrain_gpt", *args, "--max-iters", "100000")
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text()) > 400
    ):
        time.sleep(0.05)
    proc.send_signal(sig)
    said, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    last = said.strip().splitlines()[-1]
    assert last.startswith(f"stopped by {signal.Signals(sig).name} after step ")
    assert "--resume" in last
    assert "Traceback" not in err
    step = int(last.split("after step ")[1].split(":")[0])
    assert checkpoint.Checkpointer(out / "checkpoints").steps() == [step]
    records = strict_records(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, step + 1))
    resumed = command("experiments.pretrain_gpt", *args, "--max-iters", str(step + 2), "--resume")
    said, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"(step {step})" in said


def test_metrics_log_is_strict_json_and_a_resume_keeps_what_came_before(tmp_path):
    path = tmp_path / "m.jsonl"
    log = runs.MetricsLog(path)
    for step, loss in enumerate([1.0, float("nan"), float("inf"), 0.5]):
        log.record({"step": step, "loss": loss})
    log.close()
    assert [r["loss"] for r in strict_records(path)] == [1.0, None, None, 0.5]
    with path.open("a") as f:
        f.write('{"step": 4, "lo')  # a torn line, as a kill leaves it
    again = runs.MetricsLog(path, keep=2)
    again.record({"step": 2, "loss": 0.25})
    again.close()
    assert [r["step"] for r in strict_records(path)] == [0, 1, 2]


def test_interruptible_turns_signals_into_a_flag_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGINT)
    with runs.interruptible() as stop:
        assert not stop
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop and stop.signal == "SIGTERM" and stop.exit_code == 143
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt), runs.interruptible() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.exit_code == 130
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C does not wait
        time.sleep(0.01)


def test_skip_nonfinite_leaves_the_state_as_it_was_and_first_nonfinite_names_the_step():
    params = {"w": torch.ones(3)}

    def loss_fn(p, batch, key):
        loss = (p["w"] * batch["x"]).sum()
        return loss, {"loss": loss}

    opt = optim.adamw(0.1)
    step = train.make_step(loss_fn, opt, skip_nonfinite=True)
    state = train.init_state(params, opt, random.key(0))
    state, m = step(state, {"x": torch.ones(3)})
    assert float(m["skipped"]) == 0
    bad, m = step(state, {"x": torch.tensor([1.0, math.nan, 1.0])})
    assert float(m["skipped"]) == 1 and int(bad.step) == 2
    assert_trees_equal((bad.params, bad.opt_state), (state.params, state.opt_state))
    first = train.first_nonfinite(None, 1, {"loss": torch.tensor(1.0)})
    first = train.first_nonfinite(first, 2, {"loss": torch.tensor(math.inf)})
    first = train.first_nonfinite(first, 3, {"loss": torch.tensor(math.nan)})
    assert int(first) == 2
    with pytest.raises(ValueError, match="cannot donate"):
        train.make_step(loss_fn, opt, skip_nonfinite=True, donate=True)


def test_finetuning_that_diverges_saves_no_model(tmp_path):
    from experiments import finetune_classify

    rows = "".join(f"{w} film\t{i % 2}\n" for i, w in enumerate(["good", "bad"] * 40))
    for name in ("train", "dev"):
        (tmp_path / f"{name}.tsv").write_text("sentence\tlabel\n" + rows)
    flags = ["--train", str(tmp_path / "train.tsv"), "--dev", str(tmp_path / "dev.tsv"),
             "--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--d-ff", "32",
             "--vocab-size", "60", "--no-plot", "--batch-size", "8", "--epochs", "2"]  # fmt: skip
    with pytest.raises(cli.Diverged):
        finetune_classify.main([*flags, "--lr", "1e6", "--out-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_timeout_reaches_the_mesh(monkeypatch):
    monkeypatch.setenv("RANK", "0")  # as under torchrun
    seen = {}

    def make_mesh(shape, timeout):
        seen.update(shape=shape, timeout=timeout)
        raise SystemExit(0)  # no process group needed to see what was asked for

    monkeypatch.setattr("functional_llm.parallel.make_mesh", make_mesh)
    args = pretrain_gpt.parse_args(["--mesh", "dp=2", "--timeout", "12.5"])
    with pytest.raises(SystemExit):
        pretrain_gpt.sharding(args, pretrain_gpt.fl.models.GPT(pretrain_gpt.model_config(args, 8)))
    assert seen == {"shape": {"dp": 2}, "timeout": 12.5}
    with pytest.raises(SystemExit):
        pretrain_gpt.parse_args(["--timeout", "0"])


def test_stale_temporaries_in_the_run_folder_are_removed_on_start(text, tmp_path):
    out = tmp_path / "run"
    gpt(text, out, "--max-iters", "3")
    dead = out / f".metrics.jsonl.{files._HOST}-{2**22 + 4321}.abc.tmp"
    dead.mkdir()
    (dead / "metrics.jsonl").write_text("half")
    gpt(text, out, "--max-iters", "6", "--resume")
    assert not dead.exists()
