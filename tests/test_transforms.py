"""torch.func and torch.compile over the models: gradients against float64 finite differences,
vmap over examples and over whole models, compiled equals eager."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

import functional_llm as fl
from functional_llm import models, random
from tests.models_zoo import VOCAB, bert, gpt2, llama, tokens, transformer

TOL = dict(atol=1e-5, rtol=1e-5)


def lm_loss(model):
    """A scalar loss of each family's main output, for gradient checks."""
    x, y = tokens(0, (2, 6)), tokens(1, (2, 6))
    if isinstance(model, models.Transformer):
        tgt = tokens(2, (2, 5), VOCAB + 2)
        return lambda p: F.cross_entropy(
            model.apply(p, x, tgt).flatten(0, 1), tokens(3, (10,), VOCAB + 2)
        )
    if isinstance(model, models.BERT):

        def bert_loss(p):
            out = model.apply(p, x, valid=torch.tensor([[True] * 6, [True] * 4 + [False] * 2]))
            mlm = F.cross_entropy(model.mlm_logits(p, out.hidden).flatten(0, 1), y.flatten())
            return mlm + F.cross_entropy(model.nsp_logits(p, out.pooled), torch.tensor([0, 1]))

        return bert_loss
    return lambda p: F.cross_entropy(model.apply(p, x).flatten(0, 1), y.flatten())


FLOAT64 = {
    "gpt2": lambda: gpt2(dtype=torch.float64),
    "llama": lambda: llama(dtype=torch.float64),
    "bert": lambda: bert(dtype=torch.float64),
    "transformer": lambda: transformer(dtype=torch.float64),
}


@pytest.mark.parametrize("name", sorted(FLOAT64))
def test_grad_equals_float64_finite_differences(name):
    model = FLOAT64[name]()
    params = model.init(random.key(0))
    assert all(x.dtype == torch.float64 for x in fl.tree.leaves(params))
    loss = lm_loss(model)
    g = grad(loss)(params)
    eps = 1e-6
    for i in range(3):  # directional derivatives along random directions cover every coordinate
        keys = random.split(random.key(100 + i), len(fl.tree.leaves(params)))
        v = [
            random.normal(k, x.shape, torch.float64)
            for k, x in zip(keys, fl.tree.leaves(params), strict=True)
        ]
        # A unit direction: the central difference's error grows as eps^2 |v|^3, and a raw normal
        # draw over ~10^4 coordinates has |v| ~ 100.
        norm = torch.sqrt(sum((d**2).sum() for d in v))
        v = fl.tree.structure(params).unflatten([d / norm for d in v])
        plus = loss(fl.tree.map(lambda p, d: p + eps * d, params, v))
        minus = loss(fl.tree.map(lambda p, d: p - eps * d, params, v))
        fd = (plus - minus) / (2 * eps)
        analytic = sum(
            (a * b).sum() for a, b in zip(fl.tree.leaves(g), fl.tree.leaves(v), strict=True)
        )
        torch.testing.assert_close(analytic, fd, rtol=1e-6, atol=1e-8)


def _calls():
    """(model, batched call, per-example call, batched inputs) for each family and head."""
    x = tokens(0, (3, 7))
    valid = torch.tensor([[True] * 7, [True] * 5 + [False] * 2, [True] * 3 + [False] * 4])
    types = (torch.arange(7) > 3).long().expand(3, 7)
    tgt = tokens(1, (3, 5), VOCAB + 2)
    b = bert()
    return {
        "gpt2": (gpt2(), lambda m, p, x, v: m.apply(p, x, valid=v), (x, valid)),
        "llama": (llama(), lambda m, p, x, v: m.apply(p, x, valid=v), (x, valid)),
        "bert": (b, lambda m, p, x, t, v: m.apply(p, x, t, valid=v), (x, types, valid)),
        "transformer": (
            transformer(),
            lambda m, p, s, t, v: m.apply(p, s, t, src_valid=v),
            (x, tgt, valid),
        ),
        "qa_head": (models.ExtractiveQA(b), lambda m, p, x, v: m.apply(p, x, valid=v), (x, valid)),
        "classifier_head": (
            models.SequenceClassifier(gpt2(), num_labels=4),
            lambda m, p, x, v: m.apply(p, x, valid=v),
            (x, valid),
        ),
    }


CALLS = _calls()


@pytest.mark.parametrize("name", sorted(CALLS))
def test_vmap_over_examples_equals_the_batched_call(name):
    model, call, inputs = CALLS[name]
    params = model.init(random.key(0))
    batched = call(model, params, *inputs)
    per_example = vmap(lambda *xs: call(model, params, *xs))(*inputs)
    torch.testing.assert_close(per_example, batched, **TOL)


def test_vmap_over_whole_models_equals_a_loop():
    """An ensemble: params stacked along a new axis, one batched call runs every member."""
    model = llama()
    members = [model.init(k) for k in random.split(random.key(0), 3)]
    stacked = fl.tree.map(lambda *xs: torch.stack(xs), *members)
    x = tokens(0, (2, 5))
    got = vmap(model.apply, in_dims=(0, None))(stacked, x)
    want = torch.stack([model.apply(p, x) for p in members])
    torch.testing.assert_close(got, want, **TOL)
    # Per-member initialisation batches too: vmap over keys gives the same params.
    inits = vmap(model.init)(random.split(random.key(0), 3))
    for path, x in fl.tree.flatten(inits).items():
        assert torch.equal(x, fl.tree.flatten(stacked)[path]), path


@pytest.mark.parametrize(
    "name",
    ["gpt2", *(pytest.param(n, marks=pytest.mark.slow) for n in ("llama", "bert", "transformer"))],
)
def test_compiled_apply_equals_eager(name):
    model, call, inputs = CALLS[name]
    params = model.init(random.key(0))
    compiled = torch.compile(lambda p, *xs: call(model, p, *xs), fullgraph=True)
    torch.testing.assert_close(compiled(params, *inputs), call(model, params, *inputs), **TOL)
