"""Sharding numerics, fast tier: every rank simulated in this process (``LocalTensorMode`` over
a fake process group), the real DTensor dispatch and collectives' math. A few train steps
with each layout give the single-process losses and, gathered, the single-process params."""

from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from torch.distributed._local_tensor import LocalTensor, LocalTensorMode

import functional_llm as fl
from functional_llm import losses, models, optim, parallel, random, train

TP = {"heads": "tp", "kv_heads": "tp", "mlp": "tp", "vocab": "tp"}
LAYOUTS = {  # name: (mesh, rules, param-only rules)
    "dp": ({"dp": 2}, {"batch": "dp"}, {}),
    "fsdp": ({"dp": 2}, {"batch": "dp"}, {"embed": "dp"}),
    "tp": ({"tp": 2}, TP, {}),
    "dp_tp": ({"dp": 2, "tp": 2}, {"batch": "dp", **TP}, {}),
    "fsdp_tp": ({"dp": 2, "tp": 2}, {"batch": "dp", **TP}, {"embed": "dp"}),
}
STEPS = 2
# fp32 tolerance: sharded matmuls and reductions sum in another order (~1e-7 relative). The
# optimizer is SGD with momentum: Adam's first steps move a weight by about lr whatever its
# gradient's size, so a gradient that is zero up to rounding (an unused position row) would
# move by +-lr in either run; optimizers on DTensors are tested in test_optim_dtensor.py.
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
PARAM_TOL = dict(rtol=1e-5, atol=1e-6)


@contextmanager
def local_world(n: int):
    """``n`` simulated ranks: a fake process group and LocalTensorMode."""
    dist.init_process_group("fake", world_size=n, rank=0, store=dist.HashStore())
    try:
        with LocalTensorMode(frozenset(range(n))):
            yield
    finally:
        dist.destroy_process_group()


def ranks(x):
    """Each simulated rank's value of a plain result."""
    return list(x._local_tensors.values()) if isinstance(x, LocalTensor) else [x]


def gpt(**kw):
    base = dict(vocab_size=32, max_seq_len=16, d_model=16, n_layers=2, n_heads=4, dropout=0.1)
    return models.GPT(models.GPTConfig(**{**base, **kw}))


def llama():
    cfg = models.GPTConfig.llama(
        vocab_size=32, max_seq_len=16, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32
    )
    return models.GPT(cfg)


def bert():
    cfg = models.BERTConfig(
        vocab_size=32, max_seq_len=16, d_model=16, n_layers=2, n_heads=4, d_ff=32, dropout=0.1
    )
    return models.BERT(cfg)


def transformer():
    cfg = models.TransformerConfig(
        src_vocab_size=32, tgt_vocab_size=32, d_model=16, nhead=4, num_encoder_layers=1,
        num_decoder_layers=1, dim_feedforward=32, dropout=0.1, max_seq_len=16,
    )  # fmt: skip
    return models.Transformer(cfg)


def lm_batches(i):
    return {"tokens": random.randint(random.key(100 + i), (4, 9), 0, 32)}


def bert_batches(i):
    k = random.split(random.key(200 + i), 3)
    tokens = random.randint(k[0], (4, 8), 0, 32)
    labels = torch.where(random.uniform(k[1], (4, 8)) < 0.3, tokens, losses.IGNORE)
    valid = torch.ones(4, 8, dtype=torch.bool).index_fill(1, torch.tensor([7]), i % 2 == 0)
    return {"tokens": tokens, "labels": labels, "valid": valid,
            "token_types": (torch.arange(8) >= 4).long().expand(4, 8).contiguous(),
            "nsp_label": random.randint(k[2], (4,), 0, 2)}  # fmt: skip


def seq2seq_batches(i):
    k = random.split(random.key(300 + i), 2)
    tgt = random.randint(k[1], (4, 7), 0, 32)
    return {
        "src": random.randint(k[0], (4, 6), 0, 32),
        "tgt_in": tgt[:, :-1],
        "tgt_out": tgt[:, 1:],
    }


CASES = {  # name: (model, loss, batches)
    "gpt2": (gpt, losses.next_token, lm_batches),
    "llama": (llama, losses.next_token, lm_batches),
    "bert": (bert, losses.bert_pretraining, bert_batches),
    "encoder_decoder": (transformer, losses.seq2seq, seq2seq_batches),
}


def single_process(model, loss_fn, batches, opt):
    step = train.make_step(loss_fn, opt, clip_norm=1.0)
    state = train.init_state(model.init(random.key(0)), opt, random.key(1))
    metrics = []
    for b in batches:
        state, m = step(state, b)
        metrics.append(m)
    return state, metrics


def check_layout(case: str, layout: str) -> None:
    make_model, make_loss, make_batch = CASES[case]
    model, opt = make_model(), optim.sgd(0.1, momentum=0.9, weight_decay=0.01)
    batches = [make_batch(i) for i in range(STEPS)]
    want_state, want = single_process(model, make_loss(model), batches, opt)
    mesh_dims, rules, param_rules = LAYOUTS[layout]
    world = len(mesh_dims) * 2
    with local_world(world):
        mesh = parallel.make_mesh(mesh_dims)
        plan = parallel.Plan(mesh, parallel.Rules(rules, param_rules), model.axes())
        step = plan.step(train.make_step(plan.loss(make_loss(model)), opt, clip_norm=1.0))
        state = plan.shard(train.init_state(model.init(random.key(0)), opt, random.key(1)))
        got = []
        for b in batches:
            state, m = step(state, plan.shard_batch(b))
            got.append(m)
        params = plan.gather(state.params)
        for t, (g, w) in enumerate(zip(got, want, strict=True)):
            for name in ("loss", "grad_norm"):
                for value in ranks(g[name]):
                    torch.testing.assert_close(
                        value, w[name], **LOSS_TOL, msg=lambda m, n=name, t=t: f"{n} step {t}: {m}"
                    )
        for path, w in fl.tree.flatten(want_state.params).items():
            for value in ranks(fl.tree.flatten(params)[path]):
                torch.testing.assert_close(value, w, **PARAM_TOL, msg=lambda m, p=path: f"{p}: {m}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gpt_layouts_match_one_process(layout):
    check_layout("gpt2", layout)


@pytest.mark.parametrize("case", ["llama", "bert", "encoder_decoder"])
@pytest.mark.parametrize("layout", ["dp", "tp"])
def test_model_families_match_one_process(case, layout):
    check_layout(case, layout)


def test_plan_places_params_and_optimizer_state_alike():
    model = gpt()
    params, opt = model.init(random.key(0)), optim.adamw(1e-3)
    with local_world(4):
        mesh = parallel.make_mesh({"dp": 2, "tp": 2})
        plan = parallel.Plan(
            mesh, parallel.Rules({"batch": "dp", **TP}, {"embed": "dp"}), model.axes()
        )
        state = plan.shard(train.init_state(params, opt, random.key(1)))
        stored = plan.param_placements(params)
        for path, x in fl.tree.flatten(state.params).items():
            assert x.placements == stored[path], path
        flat_state = fl.tree.flatten(state.opt_state)
        moments = [p for p in flat_state if p.endswith(".blocks.0.mlp.up.w")]
        assert moments, list(flat_state)[:5]
        for p in moments:  # Adam's moments follow their param: embed over dp, mlp over tp
            assert flat_state[p].placements == stored["blocks.0.mlp.up.w"], p
        assert not isinstance(state.step, torch.distributed.tensor.DTensor)  # scalars stay plain
        assert stored["blocks.0.attn.q.w"] == (
            torch.distributed.tensor.Shard(0),
            torch.distributed.tensor.Shard(1),
        )
        table = plan.table(params)
        assert "blocks.0.attn.o.w" in table and "dp:S(2) tp:S(0)" in table
        assert "dp:R tp:S(0)" in table  # o.w as used in the step: gathered over dp


def test_plan_rejects_bad_rules_naming_param_and_axis():
    model = gpt()
    with local_world(2):
        mesh = parallel.make_mesh({"tp": 2})
        with pytest.raises(ValueError, match=r"'mlps', which no parameter has"):
            parallel.Plan(mesh, parallel.Rules({"mlps": "tp"}), model.axes())
        with pytest.raises(ValueError, match="mesh axis 'dp', but the mesh has axes \\('tp',\\)"):
            parallel.Plan(mesh, parallel.Rules({"batch": "dp"}), model.axes())
        odd = models.GPT(
            models.GPTConfig(vocab_size=33, max_seq_len=16, d_model=16, n_layers=1, n_heads=4)
        )
        plan = parallel.Plan(mesh, parallel.Rules({"vocab": "tp"}), odd.axes())
        with pytest.raises(ValueError, match=r"embed\.table: dim 0 \('vocab'\) has size 33"):
            plan.shard(odd.init(random.key(0)))
        with pytest.raises(ValueError, match=r"make_mesh: axes \{'tp': 4\} hold 4 ranks"):
            parallel.make_mesh({"tp": 4})
