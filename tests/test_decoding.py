"""Incremental decoding with the key/value cache: prefill plus decode steps give the full
forward's logits at every position (GPT-2 and Llama flavours, GQA and MQA, left padding),
eagerly and compiled with one compile for a whole generation; greedy generation with the cache
equals the cache-free sampler and batching prompts of different lengths changes nothing."""

import pytest
import torch
import torch._dynamo.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import functional_llm as fl
from functional_llm import generate as G
from functional_llm import random
from functional_llm.testing import assert_trees_equal


@st.composite
def decoders(draw):
    heads = draw(st.sampled_from([2, 4]))
    fields = dict(vocab_size=draw(st.integers(5, 40)), max_seq_len=16, d_model=8 * heads,
                  n_layers=draw(st.integers(1, 3)), n_heads=heads)  # fmt: skip
    if draw(st.booleans()):
        kv = draw(st.sampled_from([1, heads // 2, heads]))  # MQA, GQA, MHA
        return fl.models.GPTConfig.llama(**fields, n_kv_heads=kv)
    return fl.models.GPTConfig(**fields, bias=draw(st.booleans()))


def left_padded(key, batch, length, vocab, pads):
    tokens = random.randint(key, (batch, length), 0, vocab)
    valid = torch.arange(length)[None, :] >= torch.tensor(pads)[:, None]
    return tokens, valid


def full_forward(model, params, tokens, valid):
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    return model.apply(params, tokens, valid=valid, positions=positions)


@settings(max_examples=25, deadline=None)
@given(
    cfg=decoders(),
    prompt=st.integers(1, 6),
    steps=st.integers(0, 5),
    pads=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_prefill_then_decode_steps_equal_the_full_forward(cfg, prompt, steps, pads, seed):
    pads = [min(p, prompt - 1) for p in pads]  # every prompt keeps at least one real token
    model = fl.models.GPT(cfg)
    params = model.init(random.key(seed))
    tokens, valid = left_padded(random.key(seed + 1), len(pads), prompt + steps, cfg.vocab_size,
                                pads)  # fmt: skip
    want = full_forward(model, params, tokens, valid)
    logits, cache = G.prefill(model, params, tokens[:, :prompt], valid[:, :prompt],
                              max_len=prompt + steps + 1)  # fmt: skip
    got = [logits]
    for t in range(prompt, prompt + steps):
        logits, cache = G.decode_step(model, params, cache, tokens[:, t : t + 1])
        got.append(logits)
    got = torch.cat(got, dim=1)
    torch.testing.assert_close(got[valid], want[valid], rtol=0, atol=1e-5)
    assert cache.position.tolist() == valid.sum(-1).tolist()


def test_a_compiled_decode_step_matches_and_compiles_once():
    cfg = fl.models.GPTConfig.llama(vocab_size=17, max_seq_len=80, d_model=16, n_layers=2,
                                    n_heads=4, n_kv_heads=2)  # fmt: skip
    model = fl.models.GPT(cfg)
    params = model.init(random.key(0))
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(lambda c, t: G.decode_step(model, params, c, t), backend=counter,
                         fullgraph=True)  # fmt: skip
    for batch in range(3):  # three generations of one shape, 64 tokens each: one graph
        prompt, valid = left_padded(random.key(batch), 3, 5, 17, [0, 2, 4])
        _, eager = G.prefill(model, params, prompt, valid, max_len=80)
        compiled = eager
        nxt = prompt[:, -1:].contiguous()  # (a (3, 1) view of (3, 5) has other strides)
        for _ in range(64):
            want, eager = G.decode_step(model, params, eager, nxt)
            got, compiled = step(compiled, nxt)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            nxt = want[:, -1].argmax(-1, keepdim=True)
    assert counter.frame_count == 1


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_greedy_with_the_cache_equals_greedy_without(flavour):
    fields = dict(vocab_size=23, max_seq_len=24, d_model=16, n_layers=2, n_heads=2)
    cfg = (
        fl.models.GPTConfig.llama(**fields) if flavour == "llama" else fl.models.GPTConfig(**fields)
    )
    model = fl.models.GPT(cfg)
    params = model.init(random.key(3))
    prompt = random.randint(random.key(4), (2, 5), 0, 23)
    without = G.sample(model, params, prompt, 12, random.key(0), temperature=0)
    with_cache = G.generate(model, params, prompt, max_new_tokens=12)
    assert torch.equal(with_cache.tokens, without) and bool(with_cache.valid.all())


def test_a_batch_of_prompts_of_different_lengths_equals_each_alone():
    cfg = fl.models.GPTConfig.llama(vocab_size=29, max_seq_len=24, d_model=16, n_layers=2,
                                    n_heads=4, n_kv_heads=1)  # fmt: skip
    model = fl.models.GPT(cfg)
    params = model.init(random.key(5))
    prompts = [[1, 2, 3, 4, 5, 6], [7], [8, 9, 10]]
    tokens, valid = G.left_pad(prompts)
    batched = G.generate(model, params, tokens, valid, max_new_tokens=8)
    for row, p in enumerate(prompts):
        alone = G.generate(model, params, torch.tensor([p]), max_new_tokens=8)
        assert batched.tokens[row][batched.valid[row]].tolist() == alone.tokens[0].tolist()


def test_eos_finishes_a_row_and_sampling_is_a_function_of_the_key():
    cfg = fl.models.GPTConfig(vocab_size=11, max_seq_len=24, d_model=16, n_layers=1, n_heads=2)
    model = fl.models.GPT(cfg)
    params = model.init(random.key(6))
    prompt = random.randint(random.key(7), (2, 3), 0, 11)
    free = G.generate(model, params, prompt, max_new_tokens=6)
    eos = int(free.tokens[0, 4])  # row 0's second new token
    stopped = G.generate(model, params, prompt, max_new_tokens=6, eos_id=eos, pad_id=0)
    first = next(i for i in range(3, 9) if int(free.tokens[0, i]) == eos)
    assert stopped.tokens[0, : first + 1].tolist() == free.tokens[0, : first + 1].tolist()
    assert not bool(stopped.valid[0, first + 1 :].any())
    assert (stopped.tokens[0, first + 1 :] == 0).all()
    streamed = []
    a = G.generate(model, params, prompt, max_new_tokens=6, key=random.key(8), temperature=1.0,
                   top_k=5, on_token=streamed.append)  # fmt: skip
    b = G.generate(model, params, prompt, max_new_tokens=6, key=random.key(8), temperature=1.0,
                   top_k=5)  # fmt: skip
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(torch.stack(streamed, 1), a.tokens[:, 3:])


def test_sampling_with_a_key_per_row_gives_each_row_the_same_text_in_any_batch():
    cfg = fl.models.GPTConfig(vocab_size=11, max_seq_len=24, d_model=16, n_layers=1, n_heads=2)
    model = fl.models.GPT(cfg)
    params = model.init(random.key(12))
    prompts = [[1, 2, 3, 4], [5], [6, 7]]
    tokens, valid = G.left_pad(prompts)
    keys = random.split(random.key(13), 3)
    batched = G.generate(model, params, tokens, valid, max_new_tokens=6, key=keys,
                         temperature=1.0, top_p=0.9)  # fmt: skip
    for row, p in enumerate(prompts):
        alone = G.generate(model, params, torch.tensor([p]), max_new_tokens=6,
                           key=keys[row : row + 1], temperature=1.0, top_p=0.9)  # fmt: skip
        assert batched.tokens[row][batched.valid[row]].tolist() == alone.tokens[0].tolist()


def test_decode_step_is_pure_unless_the_cache_is_donated():
    cfg = fl.models.GPTConfig(vocab_size=11, max_seq_len=16, d_model=16, n_layers=2, n_heads=2)
    model = fl.models.GPT(cfg)
    params = model.init(random.key(9))
    _, cache = G.prefill(model, params, torch.tensor([[1, 2, 3]]), max_len=8)
    before = fl.tree.map(torch.clone, cache)
    pure_logits, pure = G.decode_step(model, params, cache, torch.tensor([[4]]))
    assert_trees_equal(cache, before)  # not modified
    donated_logits, donated = G.decode_step(model, params, cache, torch.tensor([[4]]), donate=True)
    assert torch.equal(donated_logits, pure_logits)
    assert_trees_equal(donated, pure)
    assert donated.k[0].data_ptr() == cache.k[0].data_ptr()  # written into the old buffers


def test_bad_decoding_input_is_named():
    cfg = fl.models.GPTConfig(vocab_size=11, max_seq_len=16, d_model=16, n_layers=2, n_heads=2)
    model = fl.models.GPT(cfg)
    params = model.init(random.key(10))
    with pytest.raises(ValueError, match=r"the prompt has 6 tokens, more than max_len \(4\)"):
        G.prefill(model, params, torch.ones(1, 6, dtype=torch.long), max_len=4)
    with pytest.raises(ValueError, match=r"tokens must be \(batch, length >= 1\)"):
        G.prefill(model, params, torch.ones(1, 0, dtype=torch.long), max_len=4)
    with pytest.raises(ValueError, match=r"max_len \(40\) must be in \[1, max_seq_len = 16\]"):
        G.prefill(model, params, torch.ones(1, 2, dtype=torch.long), max_len=40)
    _, cache = G.prefill(model, params, torch.ones(1, 3, dtype=torch.long), max_len=3)
    with pytest.raises(ValueError, match="the cache is full: 3 of 3 slots used"):
        G.decode_step(model, params, cache, torch.ones(1, 1, dtype=torch.long))
    other = fl.models.GPT(fl.models.GPTConfig(vocab_size=11, max_seq_len=16, d_model=16,
                                              n_layers=3, n_heads=2))  # fmt: skip
    with pytest.raises(ValueError, match=r"the cache has 2 layers .* this model has 3 layers"):
        G.decode_step(other, other.init(random.key(0)), cache, torch.ones(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens holds the id 11"):
        G.prefill(model, params, torch.tensor([[1, 11]]), max_len=4)
    with pytest.raises(ValueError, match=r"sampling .* needs a key"):
        G.generate(model, params, torch.ones(1, 2, dtype=torch.long), max_new_tokens=2,
                   temperature=1.0)  # fmt: skip


@pytest.mark.slow  # an inductor compile (--full tier)
def test_decode_steps_compiled_by_inductor_match_eager():
    cfg = fl.models.GPTConfig(vocab_size=19, max_seq_len=16, d_model=16, n_layers=2, n_heads=2)
    model = fl.models.GPT(cfg)
    params = model.init(random.key(11))
    step = fl.train.compile(lambda c, t: G.decode_step(model, params, c, t))
    prompt, valid = left_padded(random.key(12), 2, 4, 19, [0, 2])
    _, eager = G.prefill(model, params, prompt, valid, max_len=12)
    compiled, nxt = eager, prompt[:, -1:].contiguous()
    for _ in range(8):
        want, eager = G.decode_step(model, params, eager, nxt)
        got, compiled = step(compiled, nxt)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        nxt = want[:, -1].argmax(-1, keepdim=True)


@pytest.mark.slow  # an inductor compile (--full tier)
def test_generation_with_a_compiled_decoder_equals_eager_and_reuses_its_graph():
    cfg = fl.models.GPTConfig.llama(vocab_size=23, max_seq_len=40, d_model=16, n_layers=2,
                                    n_heads=4, n_kv_heads=2)  # fmt: skip
    model = fl.models.GPT(cfg)
    params = model.init(random.key(14))
    compiled = G.decoder(model, params, compile=True)
    for seed in range(2):
        prompt = random.randint(random.key(seed), (2, 6), 0, 23)
        eager = G.generate(model, params, prompt, max_new_tokens=24)
        fast = G.generate(model, params, prompt, max_new_tokens=24, decode=compiled)
        assert torch.equal(fast.tokens, eager.tokens)


def test_rolling_generation_past_the_cache_conditions_on_the_newest_half():
    cfg = fl.models.GPTConfig(vocab_size=11, max_seq_len=16, d_model=16, n_layers=2, n_heads=2)
    model = fl.models.GPT(cfg)
    params = model.init(random.key(15))
    prompt, width, n = [1, 2, 3], 8, 30
    out = G.generate(model, params, torch.tensor([prompt]), max_new_tokens=n, max_len=width,
                     rolling=True)  # fmt: skip
    seq, start, used = list(prompt), 0, len(prompt)  # the same schedule, without a cache
    for i in range(n):
        logits = model.apply(params, torch.tensor([seq[start:]]))
        seq.append(int(logits[0, -1].argmax()))
        if i + 1 < n and used == width:  # full: the newest half starts a fresh context
            start, used = len(seq) - width // 2, width // 2
        elif i + 1 < n:
            used += 1
    assert out.tokens[0].tolist() == seq


def test_stop_criteria_finish_rows_at_a_token_sequence_or_a_string():
    cfg = fl.models.GPTConfig(vocab_size=11, max_seq_len=24, d_model=16, n_layers=1, n_heads=2)
    model = fl.models.GPT(cfg)
    params = model.init(random.key(16))
    prompt = random.randint(random.key(17), (2, 3), 0, 11)
    run = lambda **kw: G.generate(model, params, prompt, max_new_tokens=8, key=random.key(18),  # noqa: E731
                                  temperature=1.0, **kw)  # fmt: skip
    seq = run().tokens[0].tolist()
    tail = seq[5:7]  # row 0's 3rd and 4th new tokens
    letters = lambda ids: "".join("abcdefghijk"[i] for i in ids)  # noqa: E731
    criteria = {
        "tokens": (G.stop_sequences([tail]), 3),  # may match across the end of the prompt
        "text": (G.stop_strings(letters, [letters(tail)], skip=3), 4),  # generated text only
    }
    for name, (stop, first) in criteria.items():
        end = next(i for i in range(first, 11) if seq[i - 1 : i + 1] == tail)
        out = run(stop=stop)
        assert out.valid[0, : end + 1].all() and not out.valid[0, end + 1 :].any(), name
        assert out.tokens[0, : end + 1].tolist() == seq[: end + 1], name
    with pytest.raises(ValueError, match="non-empty strings"):
        G.stop_strings(letters, [""], skip=3)
