"""Beam search: a small case checked by hand, n-best scores that are the hypotheses' own
log-probabilities (recomputed with the full forward), num_beams=1 equal to greedy, batching
prompts of different lengths equal to searching each alone."""

import math

import pytest
import torch

import functional_llm as fl
from functional_llm import generate as G
from functional_llm import random

EOS, A, B, START = 0, 1, 2, 3
TABLE = torch.tensor([  # p(next | last), rows: last token; columns: EOS, a, b, start
    [1.0, 0.0, 0.0, 0.0],
    [0.30, 0.35, 0.35, 0.0],  # after a
    [0.90, 0.05, 0.05, 0.0],  # after b
    [0.0, 0.60, 0.40, 0.0],  # after the start
]).log()  # fmt: skip


def toy(num_beams, max_new_tokens, **kw):
    def advance(beams, tokens):  # a Markov chain: the next token depends on the last only
        return TABLE[tokens]

    return G.search(TABLE[[START]], advance, num_beams=num_beams, max_new_tokens=max_new_tokens,
                    eos_ids=[EOS], **kw)  # fmt: skip


def test_a_hand_checked_search_finds_what_greedy_misses():
    # Greedy: a (0.6), then a (0.35, first of a tie): "a a", p = 0.21, no EOS in two tokens.
    # Two beams: after one token {a: 0.6, b: 0.4}; the candidates then are b EOS 0.36, a a 0.21,
    # a b 0.21, a EOS 0.18, ...: "b EOS" finishes first, and with no length penalty it wins.
    beams = toy(2, 2, length_penalty=0.0, num_return=2)
    assert beams.tokens[0, 0].tolist() == [B, EOS]
    assert math.isclose(float(beams.scores[0, 0]), math.log(0.36), rel_tol=1e-6)
    assert beams.tokens[0, 1].tolist() == [A, A] and beams.valid[0, 1].all()
    assert math.isclose(float(beams.scores[0, 1]), math.log(0.21), rel_tol=1e-6)
    greedy = toy(1, 2, length_penalty=0.0)
    assert greedy.tokens[0, 0].tolist() == [A, A]
    # With length normalisation (penalty 1) "b EOS" scores log(0.36) / 2 against "a a"'s
    # log(0.21) / 2: the order holds.
    normalised = toy(2, 2, length_penalty=1.0, num_return=2)
    assert math.isclose(float(normalised.scores[0, 0]), math.log(0.36) / 2, rel_tol=1e-6)


def model_and_params(seed=0, **kw):
    fields = dict(vocab_size=13, max_seq_len=24, d_model=16, n_layers=2, n_heads=2) | kw
    model = fl.models.GPT(fl.models.GPTConfig.llama(**fields))
    return model, model.init(random.key(seed))


def sequence_logprob(model, params, prompt, continuation):
    tokens = torch.tensor([prompt + continuation])
    logp = model.apply(params, tokens)[0].log_softmax(-1)
    return sum(float(logp[len(prompt) - 1 + i, tok]) for i, tok in enumerate(continuation))


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_every_returned_score_is_its_hypothesis_log_probability(length_penalty):
    model, params = model_and_params(1)
    prompt = [3, 1, 4]
    beams = G.beam_search(model, params, torch.tensor([prompt]), num_beams=4, num_return=4,
                          max_new_tokens=5, eos_id=2, length_penalty=length_penalty)  # fmt: skip
    scores = beams.scores[0].tolist()
    assert scores == sorted(scores, reverse=True)  # best first, non-increasing
    for j in range(4):
        hyp = beams.tokens[0, j][beams.valid[0, j]].tolist()
        assert hyp[-1] == 2 or len(hyp) == 5
        want = sequence_logprob(model, params, prompt, hyp) / len(hyp) ** length_penalty
        assert math.isclose(scores[j], want, rel_tol=1e-5, abs_tol=1e-5), (j, hyp)


def test_one_beam_is_greedy():
    model, params = model_and_params(2)
    prompt = random.randint(random.key(3), (2, 4), 0, 13)
    beams = G.beam_search(model, params, prompt, num_beams=1, max_new_tokens=7)
    greedy = G.generate(model, params, prompt, max_new_tokens=7)
    assert torch.equal(beams.tokens[:, 0], greedy.tokens[:, 4:])


def test_a_batch_of_prompts_of_different_lengths_searches_each_alone():
    model, params = model_and_params(4)
    prompts = [[5, 6, 7, 8, 9], [1, 2]]
    tokens, valid = G.left_pad(prompts)
    batched = G.beam_search(model, params, tokens, valid, num_beams=3, num_return=3,
                            max_new_tokens=6, eos_id=0)  # fmt: skip
    for row, p in enumerate(prompts):
        alone = G.beam_search(model, params, torch.tensor([p]), num_beams=3, num_return=3,
                              max_new_tokens=6, eos_id=0)  # fmt: skip
        assert torch.equal(batched.tokens[row], alone.tokens[0])
        torch.testing.assert_close(batched.scores[row], alone.scores[0], rtol=1e-5, atol=1e-5)


def test_bad_beam_arguments_are_named():
    model, params = model_and_params()
    prompt = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="num_beams must be >= 1, got 0"):
        G.beam_search(model, params, prompt, num_beams=0, max_new_tokens=3)
    with pytest.raises(ValueError, match=r"num_return must be in \[1, num_beams = 2\], got 3"):
        G.beam_search(model, params, prompt, num_beams=2, num_return=3, max_new_tokens=3)
