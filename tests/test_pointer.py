"""The pointer-generator copy head: its output is the written-out mixture of generating and
copying (a normalised distribution), its gradient matches float64 finite differences, source
padding gets no copy mass, and a model with it copies tokens it never saw in training, which
the same model without it cannot."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functional_llm as fl
from functional_llm import generate as G
from functional_llm import losses, optim, random, train
from functional_llm.nn import Pointer


def reference(params, logits, h, memory, src, src_valid):
    """The definition, one target position and one source token at a time, in float64."""
    d = h.shape[-1]
    out = torch.empty_like(logits, dtype=torch.float64)
    for b in range(h.shape[0]):
        for t in range(h.shape[1]):
            q = h[b, t].double() @ params["query"]["w"].double()
            keys = memory[b].double() @ params["key"]["w"].double()
            scores = [float(q @ keys[s]) / d**0.5 if src_valid[b, s] else float("-inf")
                      for s in range(src.shape[1])]  # fmt: skip
            a = torch.tensor(scores, dtype=torch.float64).softmax(0)
            g = torch.sigmoid(h[b, t].double() @ params["gate"]["w"].double()
                              + params["gate"]["b"].double())  # fmt: skip
            p = (1 - g) * logits[b, t].double().softmax(0)
            for s in range(src.shape[1]):
                p[src[b, s]] += g[0] * a[s]
            out[b, t] = p.log()
    return out


@settings(max_examples=20, deadline=None)
@given(
    b=st.integers(1, 3), t=st.integers(1, 4), s=st.integers(1, 6), vocab=st.integers(2, 9),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_the_output_is_the_written_out_mixture_and_a_distribution(b, t, s, vocab, seed):
    d = 8
    pointer = Pointer(d_model=d)
    k = random.split(random.key(seed), 6)
    params = pointer.init(k[0])
    logits, h = random.normal(k[1], (b, t, vocab)), random.normal(k[2], (b, t, d))
    memory = random.normal(k[3], (b, s, d))
    src = random.randint(k[4], (b, s), 0, vocab)  # repeated ids: their attention adds up
    src_valid = torch.arange(s) < random.randint(k[5], (b, 1), 1, s + 1)
    got = pointer.apply(params, logits, h, pointer.keys(params, memory), src, src_valid)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(b, t))
    want = reference(params, logits, h, memory, src, src_valid)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_the_gradient_matches_float64_finite_differences():
    d, vocab = 4, 5
    pointer = Pointer(d_model=d, dtype=torch.float64)
    params = pointer.init(random.key(0))
    src = torch.tensor([[1, 3, 1, 0]])
    src_valid = torch.tensor([[True, True, True, False]])
    logits = random.normal(random.key(1), (1, 2, vocab), torch.float64)
    h = random.normal(random.key(2), (1, 2, d), torch.float64)
    memory = random.normal(random.key(3), (1, 4, d), torch.float64)
    flat = fl.tree.flatten(params)

    def f(logits, h, memory, *leaves):
        p = fl.tree.unflatten(dict(zip(flat, leaves, strict=True)), like=params)
        return pointer.apply(p, logits, h, pointer.keys(p, memory), src, src_valid)

    inputs = tuple(x.clone().requires_grad_() for x in (logits, h, memory, *flat.values()))
    assert torch.autograd.gradcheck(f, inputs)


def test_copying_to_a_token_the_source_lacks_or_hides_is_impossible():
    pointer = Pointer(d_model=8)
    params = pointer.init(random.key(0))
    params["gate"]["b"] = torch.full((1,), 30.0)  # sigmoid(30): it (almost) always copies
    h, memory = random.normal(random.key(1), (1, 2, 8)), random.normal(random.key(2), (1, 3, 8))
    src, src_valid = torch.tensor([[2, 4, 6]]), torch.tensor([[True, True, False]])
    logp = pointer.apply(params, torch.zeros(1, 2, 7), h, pointer.keys(params, memory), src,
                         src_valid)  # fmt: skip
    p = logp.exp()
    torch.testing.assert_close(p[..., [2, 4]].sum(-1), torch.ones(1, 2), atol=1e-6, rtol=0)
    assert float(p[..., 6].max()) < 1e-6  # the padded position's token gets nothing


def copy_task(n, key, tokens, length=5):
    """``n`` pairs ``(x, x)`` of ``length`` ids drawn from ``tokens``."""
    pick = random.randint(key, (n, length), 0, len(tokens))
    x = torch.tensor(tokens)[pick]
    return x, x


@pytest.mark.parametrize("copy_source", [True, False])
def test_a_copy_head_copies_tokens_never_seen_in_training(copy_source):
    # Trained to copy sequences of 63 tokens, tested on 8 others: the output layer never had
    # them as targets, so only the copy head can produce them. Their embeddings are untrained
    # too (random), which blurs the copy attention's aim: about half come out right.
    bos, vocab, seen, unseen = 0, 72, list(range(1, 64)), list(range(64, 72))
    cfg = fl.models.TransformerConfig(
        src_vocab_size=vocab, tgt_vocab_size=vocab, d_model=32, nhead=2, num_encoder_layers=1,
        num_decoder_layers=1, dim_feedforward=64, dropout=0.0, max_seq_len=8,
        embed_std=32**-0.5, copy_source=copy_source,
    )  # fmt: skip
    model = fl.models.Transformer(cfg)
    opt = optim.adam(3e-3)
    state = train.init_state(model.init(random.key(0)), opt, random.key(3))
    step = train.make_step(losses.seq2seq(model), opt)
    for i in range(300):
        src, tgt = copy_task(32, random.fold_in(random.key(1), i), seen)
        batch = {"src": src, "tgt_in": torch.cat([torch.full((32, 1), bos), tgt[:, :-1]], 1),
                 "tgt_out": tgt}  # fmt: skip
        state, _ = step(state, batch)
    src, _ = copy_task(16, random.key(2), seen)
    out = G.generate(model, state.params, torch.full((16, 1), bos), src=src, max_new_tokens=5)
    assert (out.tokens[:, 1:] == src).float().mean() > 0.95  # both learnt the task
    src, _ = copy_task(16, random.key(2), unseen)
    out = G.generate(model, state.params, torch.full((16, 1), bos), src=src, max_new_tokens=5)
    right = (out.tokens[:, 1:] == src).float().mean().item()
    assert right > 0.3 if copy_source else right == 0.0


def test_a_copy_head_needs_one_vocabulary_and_the_source():
    with pytest.raises(ValueError, match="copy_source needs one vocabulary"):
        fl.models.TransformerConfig(src_vocab_size=10, tgt_vocab_size=12, copy_source=True)
    cfg = fl.models.TransformerConfig(
        src_vocab_size=10, tgt_vocab_size=10, d_model=8, nhead=2, num_encoder_layers=1,
        num_decoder_layers=1, dim_feedforward=16, dropout=0.0, max_seq_len=8, copy_source=True,
    )  # fmt: skip
    model = fl.models.Transformer(cfg)
    params = model.init(random.key(0))
    memory = model.encode(params, torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="needs the source ids src="):
        model.decode(params, torch.tensor([[3]]), memory)
    with pytest.raises(ValueError, match="copy head needs the source ids"):
        model.stages(2)
