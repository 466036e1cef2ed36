"""LoRA as a params transformation, and the fine-tuning mechanics: a pretrained backbone under a
fresh head, freezing by path, layer-wise learning-rate decay."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functional_llm as fl
from functional_llm import checkpoint, finetune, losses, optim, random, train
from functional_llm.lora import LoRA
from functional_llm.testing import assert_trees_close

CFG = fl.models.BERTConfig(
    vocab_size=40, max_seq_len=16, d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.0,
    dtype=torch.float64,
)  # fmt: skip
BERT = fl.models.BERT(CFG)
CLASSIFIER = fl.models.SequenceClassifier(BERT, num_labels=3)


def batch(seed, b=4, t=10):
    k = random.split(random.key(seed), 2)
    return {
        "tokens": random.randint(k[0], (b, t), 0, 40),
        "label": random.randint(k[1], (b,), 0, 3),
    }


def trained_adapters(lora, base, adapters, steps=3):
    """A few AdamW steps on the adapters alone; the base is closed over, not differentiated."""
    loss = losses.classification(CLASSIFIER)
    step = train.make_step(lambda a, b, k: loss(lora.merge(base, a), b, k), optim.adamw(0.05))
    state = train.init_state(adapters, optim.adamw(0.05), random.key(0))
    losses_seen = []
    for _ in range(steps):
        state, metrics = step(state, batch(0))
        losses_seen.append(float(metrics["loss"]))
    return state.params, losses_seen


@given(rank=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_merged_weights_equal_the_unmerged_forward_at_every_adapted_layer(rank, seed):
    lora = LoRA(rank=rank, alpha=2.0 * rank + 1)
    params = BERT.init(random.key(seed))
    adapters = lora.init(random.key(seed + 1), params, BERT.axes())
    # Give B values (it starts at zero) so the low-rank term is not trivially zero.
    adapters = fl.tree.map_with_path(
        lambda p, x: random.normal(random.fold_in(random.key(seed), len(p)), x.shape, x.dtype)
        if p.endswith(".b") else x,
        adapters,
    )  # fmt: skip
    merged = lora.merge(params, adapters)
    flat_ad = fl.tree.flatten(adapters)
    weights = sorted({p[:-2] for p in flat_ad})
    assert len(weights) == CFG.n_layers * 6  # q k v o up down per block
    for path in weights:
        a, b = flat_ad[f"{path}.a"], flat_ad[f"{path}.b"]
        w, w_merged = fl.tree.flatten(params)[path], fl.tree.flatten(merged)[path]
        x = random.normal(random.key(3), (5, a.shape[0]), torch.float64)
        explicit = lora.linear(x, w, a, b)
        assert torch.allclose(x @ w_merged.reshape(a.shape[0], -1), explicit, atol=1e-10)
    assert_trees_close(lora.unmerge(merged, adapters), params, atol=1e-12, rtol=0)


def test_fresh_adapters_leave_the_model_exactly_unchanged():
    lora = LoRA(rank=4)
    params = CLASSIFIER.init(random.key(0))
    adapters = lora.init(random.key(1), params, CLASSIFIER.axes())
    tokens = batch(0)["tokens"]
    assert torch.equal(
        CLASSIFIER.apply(lora.merge(params, adapters), tokens), CLASSIFIER.apply(params, tokens)
    )


def test_training_changes_adapters_only_and_saves_only_them(tmp_path):
    lora = LoRA(rank=4, targets=("*attn.[qv].w",))
    base = CLASSIFIER.init(random.key(0))
    snapshot = fl.tree.map(torch.clone, base)
    adapters = lora.init(random.key(1), base, CLASSIFIER.axes())
    tuned, seen = trained_adapters(lora, base, adapters, steps=5)
    assert seen[-1] < seen[0]  # the adapters alone fit the batch
    fl.testing.assert_trees_equal(base, snapshot)  # bitwise: the base never moved
    assert any(
        not torch.equal(x, y)
        for x, y in zip(fl.tree.leaves(tuned), fl.tree.leaves(adapters), strict=True)
    )
    saved = checkpoint.save(tmp_path / "adapters.safetensors", tuned)
    n_adapter = sum(x.numel() for x in fl.tree.leaves(tuned))
    assert n_adapter == CFG.n_layers * 2 * 4 * (16 + 16)  # q, v: r (n + m) each
    assert sorted(fl.tree.paths(checkpoint.load(saved))) == sorted(fl.tree.paths(tuned))
    out_merged = CLASSIFIER.apply(lora.merge(base, tuned), batch(9)["tokens"])
    assert not torch.allclose(out_merged, CLASSIFIER.apply(base, batch(9)["tokens"]))


def test_lora_rejects_bad_targets():
    params = BERT.init(random.key(0))
    with pytest.raises(ValueError, match=r"LoRA.targets: 'nothing\.\*' matches no path"):
        LoRA(targets=("nothing.*",)).init(random.key(0), params, BERT.axes())
    with pytest.raises(ValueError, match="not a matrix"):
        LoRA(targets=("*attn_norm.scale",)).init(random.key(0), params, BERT.axes())
    with pytest.raises(ValueError, match="rank"):
        LoRA(rank=0)


def test_with_backbone_attaches_pretrained_and_names_misfits():
    pretrained = BERT.init(random.key(5))
    params = finetune.with_backbone(CLASSIFIER.init(random.key(0)), pretrained)
    fl.testing.assert_trees_equal(params["backbone"], pretrained)
    wrong = {
        **pretrained,
        "pooler": {**pretrained["pooler"], "w": torch.zeros(16, 8, dtype=torch.float64)},
    }
    shapes = r"backbone\.pooler\.w: expected shape \(16, 16\), got \(16, 8\)"
    with pytest.raises(ValueError, match=shapes):
        finetune.with_backbone(params, wrong)
    with pytest.raises(ValueError, match="missing"):
        finetune.with_backbone(params, {k: v for k, v in pretrained.items() if k != "nsp"})
    single = fl.tree.map(lambda x: x.float(), pretrained)
    with pytest.raises(ValueError, match=r"torch\.float32, the model wants torch\.float64"):
        finetune.with_backbone(params, single)


def test_freeze_keeps_frozen_params_and_allocates_no_state_for_them():
    params = CLASSIFIER.init(random.key(0))
    opt = finetune.freeze(optim.adamw(0.05), "backbone.*")
    step = train.make_step(losses.classification(CLASSIFIER), opt)
    state = train.init_state(params, opt, random.key(0))
    for i in range(3):
        state, _ = step(state, batch(i))
    fl.testing.assert_trees_equal(state.params["backbone"], params["backbone"])
    assert not torch.equal(state.params["head"]["w"], params["head"]["w"])
    n_state = sum(x.numel() for x in fl.tree.leaves(state.opt_state) if isinstance(x, torch.Tensor))
    assert n_state < 3 * fl.tree.size(params["head"]) + 10  # moments for the head only


def test_layerwise_decay_scales_each_depth():
    params = CLASSIFIER.init(random.key(0))
    grads = fl.tree.map(torch.ones_like, params)
    opt = optim.chain(optim.sgd(1.0), finetune.layerwise_decay(0.5, CFG.n_layers))
    updates, _ = opt.update(grads, opt.init(params), params)
    flat = fl.tree.flatten(updates)
    expect = {
        "backbone.embed.table": 0.5**3, "backbone.blocks.0.attn.q.w": 0.5**2,
        "backbone.blocks.1.mlp.up.b": 0.5, "backbone.pooler.w": 1.0, "head.w": 1.0,
    }  # fmt: skip
    for path, scale in expect.items():
        assert torch.all(flat[path] == -scale), path
    with pytest.raises(ValueError, match="decay"):
        finetune.layerwise_decay(0.0, 2)
