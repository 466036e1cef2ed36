"""Real processes: one spawned gloo group of 2 ranks for the class (see spmd.py) runs what
needs real point-to-point and file I/O: pipeline schedules, the compiled sharded step, DCP
checkpoints; and a dying rank must end in an error, not a hang."""

import os
import sys
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import functional_llm as fl
from functional_llm import losses, models, optim, parallel, random, train
from functional_llm.parallel import checkpoint as dcp_checkpoint
from functional_llm.parallel import pipeline

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="spawned gloo groups: Linux")

TP = {"heads": "tp", "kv_heads": "tp", "mlp": "tp", "vocab": "tp"}


def gpt():
    cfg = models.GPTConfig(vocab_size=32, max_seq_len=16, d_model=16, n_layers=3, n_heads=4)
    return models.GPT(cfg)


def bert():
    cfg = models.BERTConfig(
        vocab_size=32, max_seq_len=16, d_model=16, n_layers=3, n_heads=4, d_ff=32, dropout=0.0
    )
    return models.BERT(cfg)


def transformer():
    cfg = models.TransformerConfig(
        src_vocab_size=32, tgt_vocab_size=32, d_model=16, nhead=4, num_encoder_layers=1,
        num_decoder_layers=2, dim_feedforward=32, dropout=0.0, max_seq_len=16, tie_output=True,
    )  # fmt: skip
    return models.Transformer(cfg)


def batch(i):
    return {"tokens": random.randint(random.key(100 + i), (4, 9), 0, 32)}


def mlm_batch(i):
    """Every row masks the same positions, so each micro-batch counts the same targets (the
    pipeline averages micro-batch losses; one process averages over all targets)."""
    tokens = random.randint(random.key(200 + i), (4, 8), 0, 32)
    labels = torch.full_like(tokens, losses.IGNORE)
    labels[:, ::3] = tokens[:, ::3]
    return {"tokens": tokens, "labels": labels}


def seq2seq_batch(i):
    k = random.split(random.key(300 + i), 2)
    src, tgt = random.randint(k[0], (4, 7), 0, 32), random.randint(k[1], (4, 6), 0, 32)
    return {"src": src, "tgt_in": tgt[:, :-1], "tgt_out": tgt[:, 1:]}


FAMILIES = {  # model, its loss in one process, its batches, how the pipeline splits them
    "gpt": (gpt, losses.next_token, batch, pipeline.next_token),
    "bert": (bert, losses.mlm, mlm_batch, pipeline.masked_lm),
    "transformer": (transformer, losses.seq2seq, seq2seq_batch, pipeline.seq2seq),
}


def optimizer(family: str):
    """AdamW, but SGD with momentum for the encoder-decoder: its key biases get gradients that are
    zero in exact arithmetic (softmax ignores a constant added to every score), and Adam scales
    the rounding noise there, which differs with the micro-batch split, up to lr-sized steps."""
    if family == "transformer":
        return optim.sgd(0.1, momentum=0.9)
    return optim.adamw(1e-2, weight_decay=0.1)


def numpy_tree(tree):
    return {p: x.detach().numpy() for p, x in fl.tree.flatten(tree).items()}


def single_process(model, opt, steps, clip_norm=None, loss=losses.next_token, batches=batch):
    step = train.make_step(loss(model), opt, clip_norm=clip_norm)
    state, out = train.init_state(model.init(random.key(0)), opt, random.key(1)), []
    for i in range(steps):
        state, m = step(state, batches(i))
        out.append(float(m["loss"]))
    return state, out


# -- functions run on every rank ---------------------------------------------------------------
def run_pipeline(family: str, schedule: str):
    make, _, batches, split = FAMILIES[family]
    model, opt = make(), optimizer(family)
    mesh = parallel.make_mesh({"pp": 2})
    step = pipeline.PipelineStep(
        model.stages(2), mesh, opt, n_microbatches=2, schedule=schedule, clip_norm=1.0, split=split
    )
    state, out = step.init_state(model.init(random.key(0)), random.key(1)), []
    for i in range(3):
        state, m = step(state, batches(i))
        out.append(float(m["loss"]))
    return out, numpy_tree(state.params)


def run_compiled(rules: dict, mesh_axis: str):
    """Eager, compiled, and compiled again after a dynamo reset: the second compile reads
    what the first wrote to inductor's on-disk caches (a warm cache once gave other numbers)."""
    model, opt = gpt(), optim.adamw(1e-2)
    plan = parallel.Plan(parallel.make_mesh({mesh_axis: 2}), parallel.Rules(rules), model.axes())
    inner = train.make_step(plan.loss(losses.next_token(model)), opt)
    out = {}
    for name in ("eager", "compiled", "compiled_from_cache"):
        if name == "compiled_from_cache":
            torch._dynamo.reset()
        fn = inner if name == "eager" else train.compile(inner, fullgraph=False)
        step, losses_ = plan.step(fn), []
        state = plan.shard(train.init_state(model.init(random.key(0)), opt, random.key(1)))
        for i in range(2):
            state, m = step(state, plan.shard_batch(batch(i)))
            losses_.append(float(m["loss"]))
        out[name] = (losses_, numpy_tree(plan.gather(state.params)))
    return out


def run_save_tp(path: str):
    model, opt = gpt(), optim.adamw(1e-2)
    plan = parallel.Plan(parallel.make_mesh({"tp": 2}), parallel.Rules(TP), model.axes())
    step = plan.step(train.make_step(losses.next_token(model), opt))
    state = plan.shard(train.init_state(model.init(random.key(0)), opt, random.key(1)))
    state, _ = step(state, plan.shard_batch(batch(0)))
    dcp_checkpoint.save(path, state)
    state, m = step(state, plan.shard_batch(batch(1)))
    return float(m["loss"])


def run_load_dp(path: str):
    """The tp=2 checkpoint loaded into a dp=2 layout, then one more step."""
    model, opt = gpt(), optim.adamw(1e-2)
    plan = parallel.Plan(
        parallel.make_mesh({"dp": 2}), parallel.Rules({"batch": "dp"}), model.axes()
    )
    like = plan.shard(train.init_state(model.init(random.key(5)), opt, random.key(6)))
    state = dcp_checkpoint.load(path, like)
    placements = {tuple(x.placements) for x in fl.tree.leaves(state.params)}
    step = plan.step(train.make_step(plan.loss(losses.next_token(model)), opt))
    _, m = step(state, plan.shard_batch(batch(1)))
    return float(m["loss"]), [str(p) for p in placements]


class TestTwoRanks:
    @classmethod
    def setup_class(cls):
        from spmd import Group

        cls.group = Group(2)

    @classmethod
    def teardown_class(cls):
        cls.group.close()

    @pytest.mark.parametrize(
        ("family", "schedule"),
        [("gpt", "gpipe"), ("gpt", "1f1b"), ("bert", "1f1b"), ("transformer", "1f1b")],
    )
    def test_pipeline_matches_one_process(self, family, schedule):
        make, loss, batches, _ = FAMILIES[family]
        model = make()
        opt = optimizer(family)
        want_state, want = single_process(model, opt, 3, 1.0, loss, batches)
        stages = model.stages(2)
        for rank, (got, params) in enumerate(self.group.run(run_pipeline, family, schedule)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            for path, w in fl.tree.flatten(stages[rank].select(want_state.params)).items():
                np.testing.assert_allclose(
                    params[path], w.numpy(), rtol=1e-4, atol=2e-5, err_msg=path
                )

    @pytest.mark.slow  # compiles a sharded step twice per layout (--full tier)
    @pytest.mark.parametrize("layout", ["dp", "tp"])
    def test_compiled_sharded_step_matches_eager(self, layout):
        rules = {"batch": "dp"} if layout == "dp" else TP
        for result in self.group.run(run_compiled, rules, layout):
            eager, eager_params = result["eager"]
            for name in ("compiled", "compiled_from_cache"):
                got, params = result[name]
                np.testing.assert_allclose(got, eager, rtol=1e-5, atol=1e-6, err_msg=name)
                for path, x in eager_params.items():
                    np.testing.assert_allclose(
                        params[path], x, rtol=1e-4, atol=2e-5, err_msg=f"{name} {path}"
                    )

    def test_tp_checkpoint_loads_in_one_process_and_continues(self, tmp_path):
        path = str(tmp_path / "ckpt")
        sharded_next = self.group.run(run_save_tp, path)
        model, opt = gpt(), optim.adamw(1e-2)
        like = train.init_state(model.init(random.key(5)), opt, random.key(6))  # other values
        state = dcp_checkpoint.load(path, like)
        assert int(state.step) == 1
        _, m = train.make_step(losses.next_token(model), opt)(state, batch(1))
        for loss in sharded_next:
            assert abs(float(m["loss"]) - loss) < 1e-5
        assert not (tmp_path / "ckpt.partial").exists()
        for loss, placements in self.group.run(run_load_dp, path):  # tp=2 -> dp=2
            assert placements == ["(Replicate(),)"]
            assert abs(loss - sharded_next[0]) < 1e-5


# -- a rank that dies ----------------------------------------------------------------------------
def die_or_wait(rank: int, store: str, results) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=5)
    )
    if rank == 1:
        os._exit(0)  # dies before the collective
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(3))
        results.put(("finished", time.monotonic() - start, ""))
    except Exception as e:
        results.put(("raised", time.monotonic() - start, f"{type(e).__name__}: {e}"))
    results.close()
    results.join_thread()
    os._exit(0)


def test_a_dead_rank_is_an_error_within_the_timeout(tmp_path):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=die_or_wait, args=(r, str(tmp_path / "store"), results)) for r in (0, 1)
    ]
    for p in procs:
        p.start()
    outcome, waited, message = results.get(timeout=60)
    for p in procs:
        p.join(timeout=30)
    assert outcome == "raised", "a collective with a dead peer must fail"
    assert waited < 30, f"it took {waited:.0f} s"
    assert message
