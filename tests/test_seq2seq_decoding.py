"""Decoding the encoder-decoder Transformer: the source is encoded once, each layer's
cross-attention keys and values are computed once, and the decoder's steps give the full
forward's logits; greedy and beam search on it agree with search over the full forward."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functional_llm as fl
from functional_llm import generate as G
from functional_llm import random


@st.composite
def transformers(draw):
    share = draw(st.booleans())
    src_vocab = draw(st.integers(5, 30))
    return fl.models.TransformerConfig(
        src_vocab_size=src_vocab,
        tgt_vocab_size=src_vocab if share else draw(st.integers(5, 30)),
        share_embeddings=share,
        d_model=16, nhead=draw(st.sampled_from([1, 2, 4])),
        num_encoder_layers=draw(st.integers(1, 2)), num_decoder_layers=draw(st.integers(1, 3)),
        dim_feedforward=32, dropout=0.0, max_seq_len=16, norm_first=draw(st.booleans()),
        positions=draw(st.sampled_from(["sinusoidal", "learned"])),
        tie_output=draw(st.booleans()), copy_source=share and draw(st.booleans()),
    )  # fmt: skip


@settings(max_examples=25, deadline=None)
@given(
    cfg=transformers(),
    src_len=st.integers(1, 8),
    start=st.integers(1, 3),
    steps=st.integers(0, 4),
    src_pads=st.lists(st.integers(0, 7), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_encode_then_decode_steps_equal_the_full_forward(
    cfg, src_len, start, steps, src_pads, seed
):
    model = fl.models.Transformer(cfg)
    params = model.init(random.key(seed))
    batch = len(src_pads)
    src = random.randint(random.key(seed + 1), (batch, src_len), 0, cfg.src_vocab_size)
    src_valid = torch.arange(src_len)[None, :] < src_len - torch.tensor(src_pads).clamp(
        max=src_len - 1
    )[:, None]  # right padding, at least one real source token  # fmt: skip
    tgt = random.randint(random.key(seed + 2), (batch, start + steps), 0, cfg.tgt_vocab_size)
    want = model.apply(params, src, tgt, src_valid=src_valid)
    cache = G.encode(model, params, src, src_valid, max_len=start + steps)
    logits, cache = G.decode_step(model, params, cache, tgt[:, :start])
    got = [logits]
    for t in range(start, start + steps):
        logits, cache = G.decode_step(model, params, cache, tgt[:, t : t + 1])
        got.append(logits)
    torch.testing.assert_close(torch.cat(got, dim=1), want, rtol=0, atol=1e-5)


def translator(seed=0):
    cfg = fl.models.TransformerConfig(
        src_vocab_size=19, tgt_vocab_size=11, d_model=16, nhead=2, num_encoder_layers=2,
        num_decoder_layers=2, dim_feedforward=32, dropout=0.0, max_seq_len=20,
    )  # fmt: skip
    model = fl.models.Transformer(cfg)
    return model, model.init(random.key(seed))


def naive_greedy(model, params, src, src_valid, bos, n):
    tgt = torch.full((src.shape[0], 1), bos)
    for _ in range(n):
        logits = model.apply(params, src, tgt, src_valid=src_valid)
        tgt = torch.cat([tgt, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tgt


def test_greedy_translation_with_the_cache_equals_rerunning_the_decoder():
    model, params = translator(1)
    src, src_valid = (
        random.randint(random.key(2), (3, 6), 0, 19),
        torch.ones(3, 6, dtype=torch.bool),
    )
    src_valid[0, 4:] = False
    out = G.generate(model, params, torch.full((3, 1), 1), src=src, src_valid=src_valid,
                     max_new_tokens=8)  # fmt: skip
    assert torch.equal(out.tokens, naive_greedy(model, params, src, src_valid, 1, 8))


def test_beam_search_on_a_translator_scores_its_hypotheses_and_batches_exactly():
    model, params = translator(3)
    sources = [[4, 5, 6, 7, 8], [9, 10]]
    src = torch.zeros(2, 5, dtype=torch.long)
    src_valid = torch.zeros(2, 5, dtype=torch.bool)
    for i, s in enumerate(sources):
        src[i, : len(s)], src_valid[i, : len(s)] = torch.tensor(s), True
    bos, eos = 1, 2
    beams = G.beam_search(model, params, torch.full((2, 1), bos), src=src, src_valid=src_valid,
                          num_beams=3, num_return=3, max_new_tokens=6, eos_id=eos)  # fmt: skip
    for row, s in enumerate(sources):
        alone = G.beam_search(model, params, torch.tensor([[bos]]), src=torch.tensor([s]),
                              num_beams=3, num_return=3, max_new_tokens=6, eos_id=eos)  # fmt: skip
        assert torch.equal(beams.tokens[row], alone.tokens[0])
        for j in range(3):
            hyp = beams.tokens[row, j][beams.valid[row, j]].tolist()
            tgt = torch.tensor([[bos, *hyp]])
            logp = model.apply(params, torch.tensor([s]), tgt)[0].log_softmax(-1)
            total = sum(float(logp[i, tok]) for i, tok in enumerate(hyp))
            assert math.isclose(float(beams.scores[row, j]), total / len(hyp), rel_tol=1e-5)


def test_encoder_decoder_misuse_is_named():
    model, params = translator()
    gpt = fl.models.GPT(fl.models.GPTConfig(vocab_size=11, max_seq_len=8, d_model=16, n_layers=2,
                                            n_heads=2))  # fmt: skip
    src = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="prefill is for decoder-only models"):
        G.prefill(model, params, src, max_len=4)
    with pytest.raises(TypeError, match="encode: an encoder-decoder model"):
        G.encode(gpt, gpt.init(random.key(0)), src, max_len=4)
    with pytest.raises(ValueError, match="decodes from a source: pass src="):
        G.generate(model, params, src, max_new_tokens=2)
    _, gpt_cache = G.prefill(gpt, gpt.init(random.key(0)), src, max_len=4)
    with pytest.raises(ValueError, match="this cache is for a decoder-only model"):
        G.decode_step(model, params, gpt_cache, src[:, :1])


def test_a_compiled_seq2seq_decode_step_matches_and_compiles_once():
    import torch._dynamo.testing

    model, params = translator(5)
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(lambda c, t: G.decode_step(model, params, c, t), backend=counter,
                         fullgraph=True)  # fmt: skip
    for seed in range(2):
        src = random.randint(random.key(seed), (2, 6), 0, 19)
        src_valid = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
        eager = G.encode(model, params, src, src_valid, max_len=16)
        compiled, nxt = eager, torch.full((2, 1), 1)
        for _ in range(16):
            want, eager = G.decode_step(model, params, eager, nxt)
            got, compiled = step(compiled, nxt)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            nxt = want[:, -1].argmax(-1, keepdim=True)
    assert counter.frame_count == 1
