"""Checkpoints: exact round trips, clear errors for damaged or mismatched files, no pickle,
crash safety under SIGKILL, and a resumed run bitwise equal to an uninterrupted one."""

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functional_llm as fl
from functional_llm import checkpoint, files, optim, random, train
from functional_llm.checkpoint import CheckpointError
from functional_llm.testing import assert_trees_equal

ROOT = Path(__file__).resolve().parents[1]


def state():
    cfg = fl.models.GPTConfig.llama(vocab_size=11, max_seq_len=8, d_model=8, n_layers=2, n_heads=2)
    params = fl.models.GPT(cfg).init(random.key(0))
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3))
    return train.init_state(params, opt, random.key(1)), cfg


@settings(max_examples=15)
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool]),
    shape=st.lists(st.integers(0, 4), max_size=3),
    value=st.one_of(st.integers(-(2**40), 2**40), st.floats(allow_nan=False), st.text(max_size=5)),
)
def test_round_trip_is_exact_for_any_dtype_and_plain_values(tmp_path_factory, dtype, shape, value):
    path = tmp_path_factory.mktemp("ck") / "x.safetensors"
    x = (torch.arange(max(1, torch.Size(shape).numel())) * 7 % 5).to(dtype)[
        : torch.Size(shape).numel()
    ]
    tree = {"x": x.reshape(shape), "nested": [{"v": value}, torch.ones(2)], "flag": True}
    checkpoint.save(path, tree)
    back = checkpoint.load(path, like=tree)
    assert back["nested"][0]["v"] == value and back["flag"] is True
    assert back["x"].dtype == dtype
    assert torch.equal(back["x"], tree["x"])


def test_train_state_round_trip_with_metadata(tmp_path):
    s, cfg = state()
    meta = {"config": checkpoint.config_to_dict(cfg), "data_position": 1234}
    checkpoint.save(tmp_path / "s.safetensors", s, meta)
    back = checkpoint.load(tmp_path / "s.safetensors", like=s)
    assert type(back) is train.TrainState and type(back.opt_state) is type(s.opt_state)
    assert_trees_equal(back, s)
    read = checkpoint.metadata(tmp_path / "s.safetensors")
    assert read["data_position"] == 1234 and read["torch"] == torch.__version__
    assert checkpoint.config_from_dict(fl.models.GPTConfig, read["config"]) == cfg
    loose = checkpoint.load(tmp_path / "s.safetensors")  # no template: nested dicts and lists
    assert torch.equal(loose[0]["embed"]["table"], s.params["embed"]["table"])


def test_mismatched_checkpoint_names_the_path_and_both_shapes(tmp_path):
    s, _ = state()
    checkpoint.save(tmp_path / "s.safetensors", s.params)
    other = fl.models.GPT(
        fl.models.GPTConfig.llama(vocab_size=12, max_seq_len=8, d_model=8, n_layers=3, n_heads=2)
    ).init(random.key(0))
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(tmp_path / "s.safetensors", like=other)
    message = str(err.value)
    assert "embed.table: expected (12, 8) torch.float32, found (11, 8) torch.float32" in message
    assert "blocks.2.attn.q.w: missing from the checkpoint" in message


def test_corruption_truncation_and_pickles_are_rejected_clearly(tmp_path):
    s, _ = state()
    path = checkpoint.save(tmp_path / "s.safetensors", s.params)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit in the last tensor's bytes
    (tmp_path / "flipped.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.load(tmp_path / "flipped.safetensors")
    (tmp_path / "short.safetensors").write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        checkpoint.load(tmp_path / "short.safetensors")

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    (tmp_path / "evil.safetensors").write_bytes(pickle.dumps(Exploit()))
    torch.save({"x": torch.ones(1)}, tmp_path / "torch.safetensors")
    for name in ("evil", "torch"):
        with pytest.raises(CheckpointError, match="never loaded"):
            checkpoint.load(tmp_path / f"{name}.safetensors")
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        checkpoint.load(tmp_path / "absent.safetensors")


def test_checkpointer_keeps_the_newest(tmp_path):
    manager = checkpoint.Checkpointer(tmp_path / "run", keep=2)
    assert manager.latest() is None
    for step in (10, 20, 30):
        manager.save(step, {"step": torch.tensor(step)})
    assert manager.steps() == [20, 30]
    assert int(manager.load()["step"]) == 30
    assert checkpoint.metadata(manager.path(30))["step"] == 30


CRASH_WRITER = """
import sys, torch
from functional_llm import checkpoint
path = sys.argv[1]
i = 0
while True:
    i += 1
    big = torch.full((4_000_000,), float(i))  # 16 MB: a save takes long enough to interrupt
    checkpoint.save(path, {"version": i, "data": big})
    print(i, flush=True)
"""


def test_process_killed_while_saving_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "ck.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for delay in (0.0, 0.05, 0.13, 0.21):
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASH_WRITER, str(path)], stdout=subprocess.PIPE, env=env,
            text=True,
        )  # fmt: skip
        first = proc.stdout.readline()  # one complete save exists
        assert first.strip().isdigit(), first
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        back = checkpoint.load(path)
        assert torch.equal(back["data"], torch.full((4_000_000,), float(back["version"])))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != path.name]
    # Interrupted writes leave hidden temporary directories only (safetensors' own temporary
    # is made inside ours), and the next start removes them.
    assert all(name.startswith(".ck.safetensors.") for name in leftovers), leftovers
    checkpoint.Checkpointer(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_stale_temporaries_of_live_processes_and_other_hosts_stay(tmp_path):
    live = tmp_path / f".x.safetensors.{files._HOST}-{os.getppid()}.abc.tmp"
    elsewhere = tmp_path / ".x.safetensors.otherhost-1.abc.tmp"
    dead = tmp_path / f".x.safetensors.{files._HOST}-{2**22 + 12345}.abc.tmp"
    for d in (live, elsewhere, dead):
        d.mkdir()
        (d / ".tmpAbC123").write_bytes(b"half a file")
    assert files.remove_stale(tmp_path) == [dead]
    assert live.exists() and elsewhere.exists()


_KEY = st.text(st.sampled_from("ab.\\_0"), max_size=4)
_TREES = st.recursive(
    st.integers(0, 5).map(lambda n: torch.arange(float(n))),
    lambda children: (
        st.dictionaries(_KEY, children, min_size=1, max_size=3)
        | st.lists(children, min_size=1, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(tree=st.dictionaries(_KEY, _TREES, min_size=1, max_size=4))
def test_any_string_keys_round_trip_dots_included(tmp_path_factory, tree):
    path = tmp_path_factory.mktemp("ck") / "t.safetensors"
    checkpoint.save(path, tree)
    assert_trees_equal(checkpoint.load(path, like=tree), tree)
    assert_trees_equal(checkpoint.load(path), tree)  # rebuilt from the recorded key paths


def test_dotted_keys_do_not_collide_with_nesting(tmp_path):
    tree = {"a.b": torch.ones(2), "a": {"b": torch.zeros(3)}, "__metadata__": torch.ones(1)}
    checkpoint.save(tmp_path / "c.safetensors", tree)
    back = checkpoint.load(tmp_path / "c.safetensors")
    assert torch.equal(back["a.b"], torch.ones(2)) and torch.equal(back["a"]["b"], torch.zeros(3))
    assert torch.equal(back["__metadata__"], torch.ones(1))


def test_a_fresh_run_never_rotates_away_another_runs_or_its_own_new_checkpoints(tmp_path):
    old = checkpoint.Checkpointer(tmp_path, keep=2)
    for step in (10, 20, 30, 40):
        old.save(step, {"x": torch.tensor(float(step))})
    new = checkpoint.Checkpointer(tmp_path, keep=2)
    for step in (10, 20, 25):  # overwrites the old run's 10 and 20 only by name, not rotation
        new.save(step, {"x": torch.tensor(-float(step))})
    assert new.steps() == [20, 25, 30, 40]  # new: 20, 25 kept, 10 rotated; old: 30, 40 kept
    assert float(new.load(step=25)["x"]) == -25 and float(new.load(step=40)["x"]) == 40


def test_rotation_keeps_the_last_finite_checkpoint_and_restore_prefers_it(tmp_path):
    ckpts = checkpoint.Checkpointer(tmp_path, keep=2)
    ckpts.save(10, {"x": torch.ones(3)})
    for step in (20, 30, 40):
        ckpts.save(step, {"x": torch.tensor([1.0, float("nan"), 2.0])})
    assert ckpts.steps() == [10, 30, 40]
    assert checkpoint.metadata(ckpts.path(40))["finite"] is False
    restored = checkpoint.Checkpointer(tmp_path).restore()
    assert restored.step == 10 and [p.name for p, _ in restored.skipped] == [
        "step_00000040.safetensors", "step_00000030.safetensors"
    ]  # fmt: skip


def test_restore_falls_back_past_a_corrupt_newest_checkpoint_and_keeps_the_run(tmp_path):
    ckpts = checkpoint.Checkpointer(tmp_path, keep=3)
    for step in (1, 2, 3):
        ckpts.save(step, {"x": torch.full((100,), float(step))})
    newest = ckpts.path(3)
    newest.write_bytes(newest.read_bytes()[:-40])  # truncated, as by a full disk
    again = checkpoint.Checkpointer(tmp_path, keep=3)
    restored = again.restore(like={"x": torch.zeros(100)})
    assert restored.step == 2 and float(restored.state["x"][0]) == 2
    assert restored.skipped[0][0] == newest and "not a readable" in restored.skipped[0][1]
    assert again.run == ckpts.run
    with pytest.raises(CheckpointError, match="does not fit"):  # another model: an error
        again.restore(like={"x": torch.zeros(5)})
    assert checkpoint.Checkpointer(tmp_path / "empty").restore() is None


RESUME = """
import sys, torch
import functional_llm as fl
from functional_llm import checkpoint, losses, optim, random, train

cfg = fl.models.GPTConfig(vocab_size=13, max_seq_len=8, d_model=16, n_layers=2, n_heads=2,
                          dropout=0.1, bias=False)
model = fl.models.GPT(cfg)
schedule = optim.warmup_cosine(1e-2, 2, 8, end_value=1e-3)
opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(schedule, weight_decay=0.1))
step = train.make_step(losses.next_token(model), opt)
data = random.randint(random.key(5), (400,), 0, 13)

def batch(t):  # the data position is the step: windows drawn from fold_in(key, step)
    start = random.randint(random.fold_in(random.key(6), t), (4,), 0, 400 - 9)
    windows = torch.stack([data[int(s):int(s) + 9] for s in start])
    return {"tokens": windows}

def run(state, n):
    losses_ = []
    for _ in range(n):
        state, m = step(state, batch(int(state.step)))
        losses_.append(m["loss"])
    return state, torch.stack(losses_)

mode, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
fresh = train.init_state(model.init(random.key(0)), opt, random.key(1))
if mode == "straight":
    state, trace = run(fresh, 2 * n)
elif mode == "first":
    state, trace = run(fresh, n)
else:
    prior = checkpoint.load(path, like={"state": fresh, "trace": torch.zeros(n)})
    state, rest = run(prior["state"], n)
    trace = torch.cat([prior["trace"], rest])
checkpoint.save(path, {"state": state, "trace": trace})
"""


def test_resume_in_a_fresh_process_is_bitwise_identical(tmp_path):
    def run(*args):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-c", RESUME, *args], check=True, env=env)

    n = 4
    run("straight", str(tmp_path / "straight.safetensors"), str(n))
    run("first", str(tmp_path / "resumed.safetensors"), str(n))
    run("resume", str(tmp_path / "resumed.safetensors"), str(n))
    straight = checkpoint.load(tmp_path / "straight.safetensors")
    resumed = checkpoint.load(tmp_path / "resumed.safetensors")
    assert_trees_equal(resumed, straight)  # losses, params, optimizer state, step and key
    assert len(straight["trace"]) == 2 * n
